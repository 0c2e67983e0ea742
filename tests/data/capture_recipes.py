"""One recipe per protocol: start a server in the lab's server namespace, run real clients in the
client namespace while recording, and say how (``Made.made_by``) for the manifest.

Each recipe makes two captures, usually one over IPv4 and one over IPv6 or with a second client.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import struct
import time
from collections.abc import Callable
from pathlib import Path

from capture_lab import C4, C6, HELPERS, PY, S4, S6, Lab, Made, deb_version, out, pip_version, run, version_of

Recipe = Callable[[Lab, Path], list[Made]]
RECIPES: dict[str, Recipe] = {}


def recipe(fn: Recipe) -> Recipe:
    RECIPES[fn.__name__.removeprefix("make_").replace("_", "-")] = fn  # make_http_smuggling: http-smuggling
    return fn


def helper(*args: str) -> list[str]:
    """A Python client or listener from capture_helpers.py."""
    return [PY, str(HELPERS), *args]


PY_NOTE = f"Python {'.'.join(map(str, os.sys.version_info[:3]))}"


# ---------------------------------------------------------------------------- redis


def start_redis(lab: Lab, tmp: Path) -> None:
    lab.server(["redis-server", "--bind", S4, S6, "--port", "6379", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", str(tmp), "--daemonize", "no"], log="redis.log")
    lab.wait_listen(6379)


@recipe
def make_redis(lab: Lab, tmp: Path) -> list[Made]:
    start_redis(lab, tmp)
    server = deb_version("redis-server")
    cmds = [["SET", "user:1", "alice"], ["GET", "user:1"], ["INCR", "visits"],
            ["LPUSH", "queue", "a", "b", "c"], ["LRANGE", "queue", "0", "-1"], ["HSET", "h", "f", "v"]]
    with lab.capture(out("redis", "redis-cli")):
        for c in cmds:
            lab.client(["redis-cli", "-h", S4, "-p", "6379", *c])
    with lab.capture(out("redis", "redis-py-ipv6")):
        lab.client(helper("client", "redis", S6, "6379"))
    return [
        Made("redis-cli", {"server": server, "client": deb_version("redis-tools"),
                           "commands": [f"redis-server --bind {S4} {S6} --port 6379 --save ''",
                                        *(f"redis-cli -h {S4} " + " ".join(c) for c in cmds)]},
             "Six redis-cli sessions, one command each, over IPv4.", "redis"),
        Made("redis-py-ipv6", {"server": server, "client": f"{pip_version('redis')}, {PY_NOTE}",
                               "commands": ["capture_helpers.py client redis fd00:199::1 6379"]},
             "Two redis-py sessions over IPv6: PING, SET/GET, a pipelined MULTI/EXEC.", "redis", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- postgresql

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def start_postgres(lab: Lab, tmp: Path) -> str:
    data = tmp / "pg"
    data.mkdir(mode=0o700)
    os.chown(data, _uid("postgres"), -1)
    sock = tmp / "pgsock"
    sock.mkdir()
    os.chown(sock, _uid("postgres"), -1)
    pw = tmp / "pgpw"
    pw.write_text("secret\n")
    os.chown(pw, _uid("postgres"), -1)
    run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
         "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pw}"], timeout=120)
    with open(data / "pg_hba.conf", "a") as f:
        f.write("host all all 10.199.0.0/24 scram-sha-256\nhost all all fd00:199::/64 scram-sha-256\n")
    lab.server(["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D", str(data),
                "-c", f"listen_addresses={S4},{S6}", "-c", f"unix_socket_directories={sock}", "-c", "port=5432"],
               log="postgres.log")
    lab.wait_listen(5432)
    run(["runuser", "-u", "postgres", "--", str(PG_BIN / "psql"), "-h", str(sock), "-U", "postgres", "-c",
         "CREATE TABLE users (id int primary key, name text, secret text);"
         "INSERT INTO users VALUES (1,'alice','s1'),(2,'bob','s2');"])
    return version_of([str(PG_BIN / "postgres"), "--version"])


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


@recipe
def make_postgresql(lab: Lab, tmp: Path) -> list[Made]:
    server = start_postgres(lab, tmp) + f" ({deb_version('postgresql-15')})"
    with lab.capture(out("postgresql", "psycopg")):
        lab.client(helper("client", "postgresql", S4, "5432", "benign"))
    psql = PG_BIN / "psql"
    queries = ["SELECT name FROM users ORDER BY id", "SELECT count(*) FROM pg_stat_activity"]
    with lab.capture(out("postgresql", "psql-ipv6")):
        for q in queries:
            lab.client([str(psql), f"postgresql://postgres@[{S6}]:5432/postgres?sslmode=prefer", "-c", q],
                       env={"PGPASSWORD": "secret"})
    return [
        Made("psycopg", {"server": server, "client": f"{pip_version('psycopg')}, {PY_NOTE}",
                         "commands": ["initdb --auth-host=scram-sha-256; postgres -c listen_addresses=...",
                                      "capture_helpers.py client postgresql 10.199.0.1 5432 benign"]},
             "Two psycopg 3 sessions over IPv4 (sslmode=disable and sslmode=prefer, the server has no TLS so "
             "it answers the SSLRequest with 'N'): SCRAM-SHA-256 login, SELECT, INSERT, a prepared query.",
             "postgresql"),
        Made("psql-ipv6", {"server": server, "client": version_of([str(psql), "--version"]),
                           "commands": [f"psql postgresql://postgres@[{S6}]:5432/postgres -c '{q}'" for q in queries]},
             "Two psql sessions over IPv6 with SCRAM-SHA-256 login.", "postgresql", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- mysql (MariaDB)


def start_mariadb(lab: Lab, tmp: Path) -> str:
    home = tmp / "my"
    home.mkdir()
    shutil.chown(home, "mysql", "mysql")
    data, sock = home / "data", home / "my.sock"
    run(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={data}", "--skip-test-db",
         "--auth-root-authentication-method=socket"], timeout=180)
    lab.server(["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={data}", f"--socket={sock}",
                "--bind-address=*", "--port=3306", f"--pid-file={home}/my.pid", "--skip-log-bin",
                f"--log-error={home}/error.log"], log="mariadb.log")
    lab.wait_listen(3306)
    for _ in range(50):
        if sock.exists():
            break
        time.sleep(0.2)
    run(["mariadb", f"--socket={sock}", "-uroot", "-e",
         "CREATE USER 'app'@'%' IDENTIFIED BY 'secret'; GRANT ALL ON *.* TO 'app'@'%';"
         "CREATE DATABASE shop; CREATE TABLE shop.users (id int primary key, name text, secret text);"
         "INSERT INTO shop.users VALUES (1,'alice','s1'),(2,'bob','s2');"])
    return version_of(["mariadbd", "--version"]) + f" ({deb_version('mariadb-server')})"


@recipe
def make_mysql(lab: Lab, tmp: Path) -> list[Made]:
    server = start_mariadb(lab, tmp)
    with lab.capture(out("mysql", "pymysql")):
        lab.client(helper("client", "mysql", S4, "3306", "benign"))
    queries = ["SELECT name FROM shop.users ORDER BY id", "SHOW DATABASES"]
    with lab.capture(out("mysql", "mariadb-client-ipv6")):
        for q in queries:
            lab.client(["mariadb", f"--host={S6}", "--port=3306", "-uapp", "-psecret", "--skip-ssl", "-e", q])
    return [
        Made("pymysql", {"server": server, "client": f"{pip_version('PyMySQL')}, {PY_NOTE}",
                         "commands": ["mariadb-install-db; mariadbd --bind-address=*",
                                      "capture_helpers.py client mysql 10.199.0.1 3306 benign"]},
             "Two PyMySQL sessions over IPv4: mysql_native_password login, SELECT, INSERT, COMMIT.", "mysql"),
        Made("mariadb-client-ipv6", {"server": server, "client": version_of(["mariadb", "--version"]),
                                     "commands": [f"mariadb --host={S6} -uapp -psecret -e '{q}'" for q in queries]},
             "Two sessions of the mariadb command-line client over IPv6.", "mysql", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- ssh


@recipe
def make_ssh(lab: Lab, tmp: Path) -> list[Made]:
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_ed25519")])
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id_client")])
    shutil.copy(tmp / "id_client.pub", tmp / "authorized_keys")
    (tmp / "sshd_config").write_text(
        f"Port 22\nListenAddress {S4}\nListenAddress {S6}\nHostKey {tmp}/host_ed25519\n"
        f"PidFile {tmp}/sshd.pid\nAuthorizedKeysFile {tmp}/authorized_keys\nStrictModes no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    lab.server(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")], log="sshd.log")
    lab.wait_listen(22)
    opts = ["-i", str(tmp / "id_client"), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-F", "/dev/null"]
    with lab.capture(out("ssh", "openssh")):
        lab.client(["ssh", *opts, f"root@{S4}", "echo hello from flowmap"])
        lab.client(["ssh", *opts, "-o", "Ciphers=aes128-ctr", f"root@{S4}", "uname -s"])
    with lab.capture(out("ssh", "openssh-ipv6")):
        lab.client(["ssh", *opts, "-o", "KexAlgorithms=curve25519-sha256", f"root@{S6}", "true"])
        lab.client(["ssh", *opts, "-o", "Ciphers=aes256-gcm@openssh.com", f"root@{S6}", "echo second"])
    server = version_of(["/usr/sbin/sshd", "-V"]) + f" ({deb_version('openssh-server')})"
    client = version_of(["ssh", "-V"]) + f" ({deb_version('openssh-client')})"
    return [
        Made("openssh", {"server": server, "client": client,
                         "commands": ["sshd -D -e -f <tmp>/sshd_config (generated ed25519 host key)",
                                      f"ssh -i <tmp>/id_client root@{S4} 'echo hello from flowmap'",
                                      f"ssh -o Ciphers=aes128-ctr root@{S4} 'uname -s'"]},
             "Two OpenSSH sessions over IPv4 with public-key login, each running one command.", "ssh"),
        Made("openssh-ipv6", {"server": server, "client": client,
                              "commands": [f"ssh -o KexAlgorithms=curve25519-sha256 root@{S6} true",
                                           f"ssh -o Ciphers=aes256-gcm@openssh.com root@{S6} 'echo second'"]},
             "Two OpenSSH sessions over IPv6.", "ssh", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- tls


@recipe
def make_tls(lab: Lab, tmp: Path) -> list[Made]:
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"), "-days", "2",
         "-subj", "/CN=api.flowmap.test", "-addext", "subjectAltName=DNS:api.flowmap.test"])
    for addr in (S4, f"[{S6}]"):
        lab.server(["openssl", "s_server", "-accept", f"{addr}:443", "-cert", str(tmp / "cert.pem"),
                    "-key", str(tmp / "key.pem"), "-www", "-alpn", "http/1.1"], log="s_server.log")
    lab.wait_listen(443)
    sc = ["openssl", "s_client", "-connect", f"{S4}:443", "-servername", "api.flowmap.test", "-ign_eof"]
    req = "GET / HTTP/1.0\r\nHost: api.flowmap.test\r\n\r\n"
    with lab.capture(out("tls", "openssl-s_client")):
        lab.client([*sc, "-tls1_3", "-alpn", "http/1.1"], input=req)
        lab.client([*sc, "-tls1_2"], input=req)
    with lab.capture(out("tls", "python-ssl-ipv6")):
        lab.client(helper("client", "tls", S6, "443", "www.flowmap.test", str(tmp / "cert.pem")))
    ossl = version_of(["openssl", "version"]) + f" ({deb_version('openssl')})"
    return [
        Made("openssl-s_client", {"server": f"openssl s_server, {ossl}", "client": f"openssl s_client, {ossl}",
                                  "commands": ["openssl s_server -accept ADDR:443 -www -alpn http/1.1 (self-signed EC cert; one per address)",
                                               f"openssl s_client -connect {S4}:443 -servername api.flowmap.test -tls1_3 -alpn http/1.1",
                                               f"openssl s_client -connect {S4}:443 -servername api.flowmap.test -tls1_2"]},
             "Two TLS sessions over IPv4 (TLS 1.3 with ALPN, TLS 1.2), SNI api.flowmap.test, one HTTP GET each.",
             "tls"),
        Made("python-ssl-ipv6", {"server": f"openssl s_server, {ossl}", "client": f"Python ssl module, {PY_NOTE}",
                                 "commands": ["capture_helpers.py client tls fd00:199::1 443 www.flowmap.test <cert>"]},
             "Two TLS sessions over IPv6 from Python's ssl module, SNI www.flowmap.test, ALPN h2/http1.1.",
             "tls", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- http


def start_http(lab: Lab, tmp: Path) -> None:
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("<html><body>flowmap</body></html>\n")
    (www / "data.json").write_text('{"items": [1, 2, 3]}\n')
    lab.server([PY, "-m", "http.server", "--bind", "::", "--directory", str(www), "80"], log="http.log")
    lab.wait_listen(80)


@recipe
def make_http(lab: Lab, tmp: Path) -> list[Made]:
    start_http(lab, tmp)
    with lab.capture(out("http", "curl")):
        lab.client(["curl", "-sS", "-o", "/dev/null", f"http://{S4}/index.html", "-H", "Host: web.flowmap.test"])
        lab.client(["curl", "-sS", "-o", "/dev/null", "-I", f"http://{S4}/data.json"])
        lab.client(["curl", "-sS", "-o", "/dev/null", f"http://{S4}/missing"], check=False)
    with lab.capture(out("http", "requests-ipv6")):
        lab.client(helper("client", "http", S6, "80"))
    server = f"python -m http.server ({PY_NOTE})"
    return [
        Made("curl", {"server": server, "client": version_of(["curl", "--version"]),
                      "commands": [f"curl http://{S4}/index.html -H 'Host: web.flowmap.test'",
                                   f"curl -I http://{S4}/data.json", f"curl http://{S4}/missing"]},
             "Three curl sessions over IPv4: GET 200, HEAD 200, GET 404.", "http"),
        Made("requests-ipv6", {"server": server, "client": f"{pip_version('requests')}, {PY_NOTE}",
                               "commands": ["capture_helpers.py client http fd00:199::1 80"]},
             "requests over IPv6: a keep-alive session with two GETs, then a POST (501 from http.server).",
             "http", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- sqlinjection


@recipe
def make_sqlinjection(lab: Lab, tmp: Path) -> list[Made]:
    start_http(lab, tmp)
    my = start_mariadb(lab, tmp)
    pg = start_postgres(lab, tmp)
    payloads = ["/search?q=1%27%20OR%20%271%27%3D%271", "/item?id=1%20UNION%20SELECT%20username,password%20FROM%20users--",
                "/login?user=admin%27--&pass=x"]
    with lab.capture(out("sqlinjection", "http-curl")):
        for p in payloads:
            lab.client(["curl", "-sS", "-o", "/dev/null", f"http://{S4}{p}"], check=False)
        lab.client(["curl", "-sS", "-o", "/dev/null", "--data", "user=admin' OR 1=1 -- &pass=x",
                    f"http://{S4}/login"], check=False)
    with lab.capture(out("sqlinjection", "mysql-pymysql")):
        lab.client(helper("client", "mysql", S4, "3306", "inject"))
    with lab.capture(out("sqlinjection", "postgresql-psycopg")):
        lab.client(helper("client", "postgresql", S4, "5432", "inject"))
    lab.server(helper("serve", "tds", "1433"), log="tds.log")
    lab.wait_listen(1433)
    tds_queries = ["SELECT name FROM users WHERE name = '' OR '1'='1'",
                   "SELECT name FROM users WHERE name = 'x'; DROP TABLE logins; --'"]
    with lab.capture(out("sqlinjection", "tds-tsql-listener")):
        for q in tds_queries:
            lab.client(["tsql", "-H", S4, "-p", "1433", "-U", "sa", "-P", "Secret-1", "-D", "shop"],
                       input=f"{q}\ngo\nexit\n", env={"TDSVER": "7.4"}, timeout=30)
    return [
        Made("http-curl", {"server": f"python -m http.server ({PY_NOTE})", "client": version_of(["curl", "--version"]),
                           "commands": [*(f"curl 'http://{S4}{p}'" for p in payloads),
                                        f"curl --data \"user=admin' OR 1=1 -- &pass=x\" http://{S4}/login"]},
             "Four curl sessions over IPv4 with SQL injection: three in the query string (tautology, UNION "
             "SELECT, comment), one in a POST body. The carrying protocol is http.", "sqlinjection", ["http"], "http"),
        Made("mysql-pymysql", {"server": my, "client": f"{pip_version('PyMySQL')}, {PY_NOTE}",
                               "commands": ["capture_helpers.py client mysql 10.199.0.1 3306 inject"]},
             "One PyMySQL session sending injected queries as COM_QUERY text (tautology, UNION SELECT, "
             "stacked query with comment). The carrying protocol is mysql.", "sqlinjection", ["mysql"], "mysql"),
        Made("postgresql-psycopg", {"server": pg, "client": f"{pip_version('psycopg')}, {PY_NOTE}",
                                    "commands": ["capture_helpers.py client postgresql 10.199.0.1 5432 inject"]},
             "One psycopg session sending injected queries as simple-query text. The carrying protocol is "
             "postgresql.", "sqlinjection", ["postgresql"], "postgresql"),
        Made("tds-tsql-listener", {"server": "ANSWERING LISTENER capture_helpers.py serve tds 1433 (no SQL Server can run here): "
                                             + _TDS_WHAT,
                                   "client": f"FreeTDS tsql ({deb_version('freetds-bin')}), TDSVER=7.4",
                                   "commands": [f"TDSVER=7.4 tsql -H {S4} -p 1433 -U sa -P ... -D shop <<< '{q}\\ngo'"
                                                for q in tds_queries]},
             "Two FreeTDS tsql sessions sending injected SQL batches (tautology; stacked DROP TABLE after a quote) to a "
             "listener answering TDS 7.4. The carrying protocol is tds.", "sqlinjection",
             ["tds", "answering-listener"], "tds"),
    ]


# ---------------------------------------------------------------------------- grpc


@recipe
def make_grpc(lab: Lab, tmp: Path) -> list[Made]:
    lab.server(helper("serve", "grpc", "50051"), log="grpc.log")
    lab.wait_listen(50051)
    with lab.capture(out("grpc", "grpcio")):
        lab.client(helper("client", "grpc", S4, "50051"))
    with lab.capture(out("grpc", "grpcio-ipv6")):
        lab.client(helper("client", "grpc", f"[{S6}]", "50051"))
    made_by = {"server": f"{pip_version('grpcio')} generic handlers for flowmap.demo.Greeter, {PY_NOTE}",
               "client": f"{pip_version('grpcio')}, {pip_version('protobuf')} (google.protobuf.StringValue messages)",
               "commands": ["capture_helpers.py serve grpc 50051", "capture_helpers.py client grpc HOST 50051"]}
    note = ("Two grpcio channels (plaintext HTTP/2, h2c prior knowledge): unary /flowmap.demo.Greeter/SayHello "
            "and server-streaming /flowmap.demo.Greeter/StreamHellos.")
    return [Made("grpcio", made_by, note + " IPv4.", "grpc"),
            Made("grpcio-ipv6", made_by, note + " IPv6.", "grpc", ["ipv6"])]


# ---------------------------------------------------------------------------- dns


@recipe
def make_dns(lab: Lab, tmp: Path) -> list[Made]:
    lab.server(["dnsmasq", "-k", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", f"--pid-file={tmp}/dnsmasq.pid",
                f"--listen-address={S4}", f"--listen-address={S6}", "--bind-interfaces", "--port=53",
                "--host-record=api.flowmap.test,10.199.0.81,fd00:199::81",
                "--cname=www.flowmap.test,api.flowmap.test", "--address=/blocked.flowmap.test/0.0.0.0",
                "--mx-host=flowmap.test,mail.flowmap.test,10", "--local=/flowmap.test/", "--local-ttl=300",
                "--log-queries"], log="dnsmasq.log")
    lab.wait_listen(53, udp=True)
    queries = [["api.flowmap.test", "A"], ["api.flowmap.test", "AAAA"], ["www.flowmap.test", "A"],
               ["flowmap.test", "MX"], ["nxdomain.flowmap.test", "A"]]
    with lab.capture(out("dns", "dig")):
        for name, qtype in queries:
            lab.client(["dig", f"@{S4}", name, qtype, "+tries=1", "+time=2"], check=False)
        lab.client(["dig", f"@{S4}", "+tcp", "www.flowmap.test", "AAAA"], check=False)
    with lab.capture(out("dns", "dnspython-ipv6")):
        lab.client(helper("client", "dns", S6, "53"))
    server = version_of(["dnsmasq", "--version"]) + f" ({deb_version('dnsmasq-base')})"
    return [
        Made("dig", {"server": server, "client": version_of(["dig", "-v"]) + f" ({deb_version('bind9-dnsutils')})",
                     "commands": ["dnsmasq -k --host-record=api.flowmap.test,10.199.0.81,fd00:199::81 "
                                  "--cname=www.flowmap.test,api.flowmap.test --local=/flowmap.test/ --local-ttl=300 ...",
                                  *(f"dig @{S4} {n} {t}" for n, t in queries), f"dig @{S4} +tcp www.flowmap.test AAAA"]},
             "Five UDP queries (A, AAAA, CNAME chain, MX, NXDOMAIN) and one over TCP, over IPv4.", "dns"),
        Made("dnspython-ipv6", {"server": server, "client": f"{pip_version('dnspython')}, {PY_NOTE}",
                                "commands": ["capture_helpers.py client dns fd00:199::1 53"]},
             "dnspython over IPv6: A, AAAA and CNAME queries over UDP, one over TCP.", "dns", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- dhcp


@recipe
def make_dhcp(lab: Lab, tmp: Path) -> list[Made]:
    lab.sh(lab.ns_c, ["ip", "addr", "flush", "dev", lab.if_c, "scope", "global"])
    lab.server(["dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", f"--interface={lab.if_s}", "--bind-interfaces",
                f"--pid-file={tmp}/dnsmasq.pid", "--dhcp-range=10.199.0.100,10.199.0.150,255.255.255.0,1h",
                f"--dhcp-leasefile={tmp}/leases", "--dhcp-authoritative", "--dhcp-option=option:router,10.199.0.1",
                "--log-dhcp"], log="dnsmasq-dhcp.log")
    lab.wait_listen(67, udp=True)
    dh = ["dhclient", "-1", "-v", "-sf", "/bin/true", "-lf", str(tmp / "dhclient.leases"),
          "-pf", str(tmp / "dhclient.pid"), lab.if_c]
    with lab.capture(out("dhcp", "dhclient")):
        lab.client(dh, timeout=60)
        lab.client(["dhclient", "-r", "-v", "-sf", "/bin/true", "-lf", str(tmp / "dhclient.leases"),
                    "-pf", str(tmp / "dhclient.pid"), lab.if_c], timeout=30, check=False)
    with lab.capture(out("dhcp", "udhcpc")):
        lab.client(["busybox", "udhcpc", "-f", "-q", "-n", "-R", "-t", "3", "-i", lab.if_c, "-s", "/bin/true",
                    "-x", "hostname:flowmap-client"], timeout=60)
    server = version_of(["dnsmasq", "--version"]) + f" ({deb_version('dnsmasq-base')})"
    return [
        Made("dhclient", {"server": server, "client": version_of(["dhclient", "--version"]) + f" ({deb_version('isc-dhcp-client')})",
                          "commands": ["dnsmasq -k --port=0 --dhcp-range=10.199.0.100,10.199.0.150,255.255.255.0,1h",
                                       "dhclient -1 -sf /bin/true IFACE", "dhclient -r -sf /bin/true IFACE"]},
             "ISC dhclient: DISCOVER/OFFER/REQUEST/ACK, then RELEASE.", "dhcp"),
        Made("udhcpc", {"server": server, "client": version_of(["busybox"]) + " udhcpc",
                        "commands": ["busybox udhcpc -f -q -n -R -i IFACE -s /bin/true -x hostname:flowmap-client"]},
             "busybox udhcpc: DISCOVER/OFFER/REQUEST/ACK, then RELEASE on exit.", "dhcp"),
    ]


# ---------------------------------------------------------------------------- tftp


@recipe
def make_tftp(lab: Lab, tmp: Path) -> list[Made]:
    root = tmp / "tftp"
    root.mkdir()
    root.chmod(0o777)
    (root / "boot.cfg").write_text("default flowmap\n" * 40)
    (root / "kernel.bin").write_bytes(bytes(range(256)) * 6)
    lab.server(["in.tftpd", "-L", "-c", "-s", str(root), "--address", "[::]:69", "-u", "root"], log="tftpd.log")
    lab.wait_listen(69, udp=True)
    upload = tmp / "upload.txt"
    upload.write_text("uploaded by flowmap\n" * 10)
    with lab.capture(out("tftp", "tftp-hpa")):
        lab.client(["tftp", S4, "-c", "get", "boot.cfg", str(tmp / "got.cfg")])
        lab.client(["tftp", S4, "-c", "put", str(upload), "upload.txt"])
    with lab.capture(out("tftp", "busybox-ipv6")):
        lab.client(["busybox", "tftp", "-g", "-r", "kernel.bin", "-l", str(tmp / "got.bin"), S6])
        lab.client(["busybox", "tftp", "-g", "-b", "1024", "-r", "boot.cfg", "-l", str(tmp / "got2.cfg"), S6])
    server = version_of(["in.tftpd", "-V"]) + f" ({deb_version('tftpd-hpa')})"
    return [
        Made("tftp-hpa", {"server": server, "client": deb_version("tftp-hpa"),
                          "commands": ["in.tftpd -L -c -s ROOT --address [::]:69", f"tftp {S4} -c get boot.cfg",
                                       f"tftp {S4} -c put upload.txt"]},
             "tftp-hpa over IPv4: one RRQ (2 blocks) and one WRQ. Data flows come from the server's new port.", "tftp"),
        Made("busybox-ipv6", {"server": server, "client": version_of(["busybox"]) + " tftp",
                              "commands": [f"busybox tftp -g -r kernel.bin {S6}", f"busybox tftp -g -b 1024 -r boot.cfg {S6}"]},
             "busybox tftp over IPv6: two RRQs, one with the blksize option (OACK).", "tftp", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- ntp


@recipe
def make_ntp(lab: Lab, tmp: Path) -> list[Made]:
    (tmp / "chrony-server.conf").write_text(
        f"allow all\nlocal stratum 8\nport 123\ncmdport 0\npidfile {tmp}/chronyd-server.pid\n"
        f"bindaddress {S4}\nbindaddress {S6}\n")
    # -x: never touch the host's clock; -U: run as root so the temp dir needs no chown.
    lab.server(["chronyd", "-d", "-x", "-U", "-u", "root", "-f", str(tmp / "chrony-server.conf")], log="chronyd.log")
    lab.wait_listen(123, udp=True)
    time.sleep(1)
    with lab.capture(out("ntp", "sntp")):
        lab.client(["sntp", "-t", "2", S4], check=False)
        lab.client(["sntp", "-t", "2", S4], check=False)
    (tmp / "chrony-client.conf").write_text(
        f"server {S6} iburst maxsamples 4\ncmdport 0\npidfile {tmp}/chronyd-client.pid\nport 0\n")
    with lab.capture(out("ntp", "chronyd-ipv6")):
        lab.client(["chronyd", "-Q", "-U", "-u", "root", "-t", "20", "-f", str(tmp / "chrony-client.conf")],
                   timeout=40, check=False)
    server = version_of(["chronyd", "--version"]) + f" ({deb_version('chrony')})"
    return [
        Made("sntp", {"server": server, "client": version_of(["sntp", "--version"]) + f" ({deb_version('sntp')})",
                      "commands": ["chronyd -d -x (allow all, local stratum 8)", f"sntp -t 2 {S4}", f"sntp -t 2 {S4}"]},
             "Two sntp queries (NTPv4 client mode) over IPv4.", "ntp"),
        Made("chronyd-ipv6", {"server": server, "client": server + " in client mode: chronyd -Q",
                              "commands": [f"chronyd -Q -t 20 'server {S6} iburst maxsamples 4'"]},
             "chronyd -Q (measure, do not set the clock) polling over IPv6.", "ntp", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- echo


@recipe
def make_echo(lab: Lab, tmp: Path) -> list[Made]:
    lab.server(["socat", "TCP6-LISTEN:7,ipv6only=0,fork,reuseaddr", "PIPE"], log="echo-tcp.log")
    lab.server(["socat", "-T", "2", "UDP6-LISTEN:7,ipv6only=0,fork,reuseaddr", "PIPE"], log="echo-udp.log")
    lab.wait_listen(7)
    lab.wait_listen(7, udp=True)
    lines = ["hello echo", "flowmap says hi " * 3, "0123456789abcdef" * 20]
    # Interactive: one line at a time, each echoed before the next is written.
    typed = "; ".join(f"printf '%s\\n' '{t}'; sleep 0.3" for t in lines)
    with lab.capture(out("echo", "socat-tcp")):
        for _ in range(2):
            lab.client(["sh", "-c", f"({typed}) | socat -t 2 - TCP4:{S4}:7"])
        # Write everything and half-close at once: the echo comes back after the client's FIN.
        lab.client(["socat", "-t", "2", "-", f"TCP4:{S4}:7"], input="\n".join(lines) + "\n")
    with lab.capture(out("echo", "socat-udp-tcp-ipv6")):
        for _ in range(2):
            lab.client(["sh", "-c", f"({typed}) | socat -t 1 - UDP6:[{S6}]:7"])
        lab.client(["sh", "-c", f"({typed}) | socat -t 2 - TCP6:[{S6}]:7"])
    return [
        Made("socat-tcp", {"server": f"socat TCP6-LISTEN:7,ipv6only=0,fork PIPE ({deb_version('socat')})",
                           "client": f"socat - TCP4:{S4}:7 ({deb_version('socat')})",
                           "commands": ["socat TCP6-LISTEN:7,ipv6only=0,fork,reuseaddr PIPE",
                                        f"(printf LINE; sleep 0.3; ...) | socat -t 2 - TCP4:{S4}:7 (twice)",
                                        f"printf LINES | socat -t 2 - TCP4:{S4}:7"]},
             "Three TCP echo sessions (port 7) over IPv4: two interactive (three lines, each echoed before the "
             "next), one that writes everything and half-closes at once (the echo follows the client's FIN).",
             "echo"),
        Made("socat-udp-tcp-ipv6", {"server": "socat UDP6-LISTEN:7 PIPE and TCP6-LISTEN:7 PIPE " + f"({deb_version('socat')})",
                                    "client": f"socat ({deb_version('socat')})",
                                    "commands": [f"(printf LINE; sleep 0.3; ...) | socat -t 1 - UDP6:[{S6}]:7 (twice)",
                                                 f"(printf LINE; sleep 0.3; ...) | socat -t 2 - TCP6:[{S6}]:7"]},
             "Two UDP echo flows (three datagrams each, each echoed) and one interactive TCP echo session, "
             "over IPv6.", "echo", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- zookeeper


@recipe
def make_zookeeper(lab: Lab, tmp: Path) -> list[Made]:
    (tmp / "zk").mkdir()
    (tmp / "zoo.cfg").write_text(f"tickTime=2000\ndataDir={tmp}/zk\nclientPort=2181\nadmin.enableServer=false\n"
                                 "4lw.commands.whitelist=ruok,srvr\n")
    (tmp / "log4j.properties").write_text("log4j.rootLogger=INFO, CONSOLE\nlog4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
                                          "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n")
    cp = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar:/usr/share/java/*"
    lab.server(["java", "-Xmx256m", "-cp", cp, "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(tmp / "zoo.cfg")],
               log="zookeeper.log")
    lab.wait_listen(2181, timeout=120)
    with lab.capture(out("zookeeper", "kazoo")):
        lab.client(helper("client", "zookeeper", S4, "2181"))
    with lab.capture(out("zookeeper", "zkcli-ipv6")):
        lab.client(["java", "-cp", cp, "org.apache.zookeeper.ZooKeeperMain", "-server", f"[{S6}]:2181",
                    "create", "/flowmap-cli", "hello"], timeout=90, check=False)
        lab.client(["java", "-cp", cp, "org.apache.zookeeper.ZooKeeperMain", "-server", f"[{S6}]:2181",
                    "ls", "/"], timeout=90, check=False)
    server = f"{deb_version('zookeeper')} QuorumPeerMain standalone, " + version_of(["java", "-version"])
    return [
        Made("kazoo", {"server": server, "client": f"{pip_version('kazoo')}, {PY_NOTE}",
                       "commands": ["java org.apache.zookeeper.server.quorum.QuorumPeerMain zoo.cfg",
                                    "capture_helpers.py client zookeeper 10.199.0.1 2181"]},
             "One kazoo session over IPv4: connect, ensure_path, create, get, set, get_children, delete, close.",
             "zookeeper"),
        Made("zkcli-ipv6", {"server": server, "client": f"ZooKeeperMain (zkCli) from {deb_version('zookeeper')}",
                            "commands": [f"ZooKeeperMain -server [{S6}]:2181 create /flowmap-cli hello",
                                         f"ZooKeeperMain -server [{S6}]:2181 ls /"]},
             "Two sessions of ZooKeeper's own Java command-line client over IPv6.", "zookeeper", ["ipv6"]),
    ]


# ---------------------------------------------------------------------------- couchbase (memcached binary protocol)


@recipe
def make_couchbase(lab: Lab, tmp: Path) -> list[Made]:
    lab.server(["memcached", "-B", "binary", "-U", "0", "-p", "11210", "-l", f"{S4},[{S6}]", "-u", "root", "-m", "16"],
               log="memcached.log")
    lab.wait_listen(11210)
    with lab.capture(out("couchbase", "bmemcached")):
        lab.client(helper("client", "couchbase", S4, "11210"))
    with lab.capture(out("couchbase", "couchbase-sdk-ipv6")):
        lab.client(helper("client", "couchbase_sdk", S6, "11210"), timeout=60)
    server = version_of(["memcached", "-V"]) + f" ({deb_version('memcached')}) with -B binary on 11210"
    made = "memcached -B binary -U 0 -p 11210"
    return [
        Made("bmemcached", {"server": server, "client": f"{pip_version('python-binary-memcached')}, {PY_NOTE}",
                            "commands": [made, "capture_helpers.py client couchbase 10.199.0.1 11210"]},
             "Couchbase's data service (port 11210) speaks the memcached binary protocol (magic 0x80/0x81); "
             "no Couchbase Server package exists here, so the server is memcached in binary mode. "
             "python-binary-memcached: SET, GET, ADD, INCR, GET of a missing key, DELETE, STAT. IPv4.",
             "couchbase", ["memcached-binary"]),
        Made("couchbase-sdk-ipv6", {"server": server, "client": f"{pip_version('couchbase')} (Couchbase Python SDK), {PY_NOTE}",
                                    "commands": [made, "capture_helpers.py client couchbase_sdk fd00:199::1 11210"]},
             "The Couchbase Python SDK bootstrapping against port 11210 over IPv6: HELLO (with its JSON agent "
             "name), GET_ERROR_MAP, SASL; memcached answers those Couchbase-only opcodes with 'unknown command', "
             "so the SDK retries until its 4 s bootstrap timeout. The client bytes are the real SDK's.",
             "couchbase", ["memcached-binary", "ipv6"]),
    ]


# ---------------------------------------------------------------------------- spark

_PYSPARK = importlib.util.find_spec("pyspark")
SPARK_HOME = Path(_PYSPARK.origin).parent if _PYSPARK and _PYSPARK.origin else None


@recipe
def make_spark(lab: Lab, tmp: Path) -> list[Made]:
    if SPARK_HOME is None:
        raise RuntimeError("pyspark is not installed (pip install -e '.[captures]')")
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    env = {"SPARK_HOME": str(SPARK_HOME), "SPARK_LOG_DIR": str(tmp), "SPARK_NO_DAEMONIZE": "1",
           "SPARK_LOCAL_DIRS": str(tmp / "local"), "SPARK_CONF_DIR": str(tmp / "conf")}
    (tmp / "conf").mkdir()
    (tmp / "conf" / "log4j2.properties").write_text(
        "rootLogger.level = info\nrootLogger.appenderRef.stdout.ref = console\nappender.console.type = Console\n"
        "appender.console.name = console\nappender.console.layout.type = PatternLayout\n")
    lab.server([spark_class, "org.apache.spark.deploy.master.Master", "--host", S4, "--port", "7077",
                "--webui-port", "8080"], log="spark-master.log", env={**env, "SPARK_LOCAL_IP": S4})
    lab.wait_listen(7077, timeout=180)
    master_log = tmp / "spark-master.log"
    with lab.capture(out("spark", "standalone-worker")):
        worker = lab.background_client(
            [spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://{S4}:7077", "--host", C4,
             "--webui-port", "8081", "--cores", "1", "--memory", "512m", "--work-dir", str(tmp / "work")],
            log="spark-worker.log", env={**env, "SPARK_LOCAL_IP": C4})
        _wait_text(master_log, "Registering worker", 180)
        time.sleep(3)
        os.killpg(worker.pid, 15)
        worker.wait(30)
    with lab.capture(out("spark", "pyspark-driver")):
        lab.client(helper("client", "spark", S4, "7077"), timeout=240,
                   env={**env, "SPARK_LOCAL_IP": C4, "PYSPARK_PYTHON": PY})
        _wait_text(master_log, "Registering app", 10)
    version = f"Apache Spark {pip_version('pyspark').split()[-1]} (from {pip_version('pyspark')}), " + version_of(["java", "-version"])
    return [
        Made("standalone-worker", {"server": f"{version}: org.apache.spark.deploy.master.Master",
                                   "client": f"{version}: org.apache.spark.deploy.worker.Worker",
                                   "commands": [f"spark-class org.apache.spark.deploy.master.Master --host {S4} --port 7077",
                                                f"spark-class org.apache.spark.deploy.worker.Worker spark://{S4}:7077 --host {C4}"]},
             "A standalone Spark worker registering with the master over Spark RPC (netty transport), "
             "heartbeats, then the worker stops.", "spark"),
        Made("pyspark-driver", {"server": f"{version}: org.apache.spark.deploy.master.Master",
                                "client": f"{version}: a pyspark driver (SparkSession, master spark://{S4}:7077)",
                                "commands": ["capture_helpers.py client spark 10.199.0.1 7077"]},
             "A pyspark driver registering an application with the standalone master over Spark RPC, then "
             "stopping (no worker: the application is registered, not run).", "spark"),
    ]


def _wait_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} never appeared in {path}")


# ---------------------------------------------------------------------------- kafka (real broker from Maven Central)

CACHE = Path(os.environ.get("FLOWMAP_CAPTURES_CACHE", Path.home() / ".cache" / "flowmap-captures"))
KAFKA_VERSION = "3.9.2"
_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>dev.flowmap</groupId><artifactId>captures-servers</artifactId><version>1</version><packaging>pom</packaging>
<dependencies>{deps}</dependencies></project>"""


def maven_jars(name: str, deps: list[tuple[str, str, str]]) -> Path:
    """Resolve ``deps`` (group, artifact, version) and their runtime dependencies from Maven Central
    with Debian's ``mvn`` into a cached directory of jars."""
    lib = CACHE / name / "lib"
    if lib.is_dir() and any(lib.glob("*.jar")):
        return lib
    work = CACHE / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(_POM.format(deps="".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in deps)))
    run(["mvn", "-B", "-q", f"-Dmaven.repo.local={CACHE / 'm2'}", "-f", str(work / "pom.xml"),
         "dependency:copy-dependencies", f"-DoutputDirectory={lib}", "-DincludeScope=runtime"], timeout=1200)
    return lib


@recipe
def make_kafka(lab: Lab, tmp: Path) -> list[Made]:
    lib = maven_jars(f"kafka-{KAFKA_VERSION}", [("org.apache.kafka", "kafka_2.13", KAFKA_VERSION),
                                                ("org.slf4j", "slf4j-reload4j", "1.7.36")])
    cp = f"{lib}/*"
    props = tmp / "server.properties"
    props.write_text(
        "process.roles=broker,controller\nnode.id=1\n"
        f"controller.quorum.voters=1@{S4}:9093\nlisteners=PLAINTEXT://{S4}:9092,CONTROLLER://{S4}:9093\n"
        f"advertised.listeners=PLAINTEXT://{S4}:9092\ncontroller.listener.names=CONTROLLER\n"
        "inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
        f"log.dirs={tmp}/kafka-logs\nnum.partitions=1\noffsets.topic.replication.factor=1\n"
        "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
        "group.initial.rebalance.delay.ms=0\nauto.create.topics.enable=true\n")
    (tmp / "log4j.properties").write_text(
        "log4j.rootLogger=INFO, stdout\nlog4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
        "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n")
    java = ["java", "-Xmx512m", f"-Dlog4j.configuration=file:{tmp}/log4j.properties", "-cp", cp]
    cluster = run([*java, "kafka.tools.StorageTool", "random-uuid"]).stdout.strip().splitlines()[-1]
    run([*java, "kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(props)], timeout=120)
    lab.server([*java, "kafka.Kafka", str(props)], log="kafka.log")
    lab.wait_listen(9092, timeout=180)
    with lab.capture(out("kafka", "kafka-python-producer")):
        lab.client(helper("client", "kafka_produce", S4, "9092"), timeout=120)
    with lab.capture(out("kafka", "kafka-python-consumer")):
        lab.client(helper("client", "kafka_consume", S4, "9092"), timeout=120)
    server = f"Apache Kafka {KAFKA_VERSION} (KRaft, broker+controller; org.apache.kafka:kafka_2.13 from Maven Central), " \
        + version_of(["java", "-version"])
    cmds = [f"java -cp kafka_2.13-{KAFKA_VERSION}/* kafka.tools.StorageTool format; java ... kafka.Kafka server.properties"]
    return [
        Made("kafka-python-producer", {"server": server, "client": f"{pip_version('kafka-python')}, {PY_NOTE}",
                                       "commands": [*cmds, "capture_helpers.py client kafka_produce 10.199.0.1 9092"]},
             "kafka-python KafkaProducer over IPv4: ApiVersions, Metadata (auto-creating topic 'flowmap'), "
             "Produce of three records.", "kafka"),
        Made("kafka-python-consumer", {"server": server, "client": f"{pip_version('kafka-python')}, {PY_NOTE}",
                                       "commands": [*cmds, "capture_helpers.py client kafka_consume 10.199.0.1 9092"]},
             "kafka-python KafkaConsumer in group 'flowmap-capture' over IPv4: ApiVersions, Metadata, "
             "FindCoordinator, JoinGroup, SyncGroup, ListOffsets, Fetch, OffsetCommit, LeaveGroup.", "kafka"),
    ]


# ---------------------------------------------------------------------------- cassandra (real server from Maven Central)

CASSANDRA_VERSION = "5.0.9"
# What Cassandra's own conf/jvm17-server.options passes to Java 17.
_JVM17 = [f"--add-exports={m}=ALL-UNNAMED" for m in (
    "java.base/jdk.internal.misc", "java.base/jdk.internal.ref", "java.base/sun.nio.ch",
    "java.management.rmi/com.sun.jmx.remote.internal.rmi", "java.rmi/sun.rmi.registry", "java.rmi/sun.rmi.server",
    "java.sql/java.sql", "java.base/java.lang.ref", "jdk.unsupported/sun.misc")] + [
    f"--add-opens={m}=ALL-UNNAMED" for m in (
    "java.base/java.lang.module", "java.base/jdk.internal.loader", "java.base/jdk.internal.ref",
    "java.base/jdk.internal.reflect", "java.base/jdk.internal.math", "java.base/jdk.internal.module",
    "java.base/jdk.internal.util.jar", "jdk.management/com.sun.management.internal", "java.base/sun.nio.ch",
    "java.base/java.io", "java.base/java.nio", "java.base/java.util.concurrent", "java.base/java.util",
    "java.base/java.util.concurrent.atomic", "java.base/java.lang", "java.base/java.math",
    "java.base/java.lang.reflect", "java.base/java.net")]


@recipe
def make_cassandra(lab: Lab, tmp: Path) -> list[Made]:
    lib = maven_jars(f"cassandra-{CASSANDRA_VERSION}", [("org.apache.cassandra", "cassandra-all", CASSANDRA_VERSION)])
    home = tmp / "cassandra"
    home.mkdir()
    (home / "cassandra.yaml").write_text(f"""cluster_name: flowmap
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_directory: {home}/commitlog
data_file_directories: [{home}/data]
saved_caches_directory: {home}/saved_caches
hints_directory: {home}/hints
cdc_raw_directory: {home}/cdc_raw
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{S4}:7000"
listen_address: {S4}
rpc_address: "::"
broadcast_rpc_address: {S4}
native_transport_port: 9042
start_native_transport: true
endpoint_snitch: SimpleSnitch
authenticator: PasswordAuthenticator
authorizer: AllowAllAuthorizer
""")
    (home / "logback.xml").write_text(
        '<configuration><appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender"><encoder>'
        '<pattern>%level %logger{0} %msg%n</pattern></encoder></appender>'
        '<root level="INFO"><appender-ref ref="STDOUT"/></root></configuration>\n')
    lab.server(["java", "-Xms512m", "-Xmx1g", "-Djdk.attach.allowAttachSelf=true", *_JVM17,
                f"-Dcassandra.config=file://{home}/cassandra.yaml", "-Dcassandra-foreground=yes",
                f"-Dcassandra.storagedir={home}", f"-Dlogback.configurationFile={home}/logback.xml",
                "-Dcassandra.skip_wait_for_gossip_to_settle=0", "-Dcassandra.superuser_setup_delay_ms=0",
                "-cp", f"{lib}/*", "org.apache.cassandra.service.CassandraDaemon"], log="cassandra.log")
    lab.wait_listen(9042, timeout=300)
    _wait_text(tmp / "cassandra.log", "Created default superuser", 120)
    with lab.capture(out("cassandra", "cassandra-driver")):
        lab.client(helper("client", "cassandra", S4, "9042"), timeout=120)
    with lab.capture(out("cassandra", "cassandra-driver-ipv6")):
        lab.client(helper("client", "cassandra", S6, "9042"), timeout=120)
    server = (f"Apache Cassandra {CASSANDRA_VERSION} (org.apache.cassandra:cassandra-all from Maven Central, "
              f"CassandraDaemon, PasswordAuthenticator), " + version_of(["java", "-version"]))
    made_by = {"server": server, "client": f"{pip_version('cassandra-driver')}, {PY_NOTE}",
               "commands": ["java --add-opens... -Dcassandra.config=file://.../cassandra.yaml -cp cassandra-all-5.0.9/* "
                            "org.apache.cassandra.service.CassandraDaemon", "capture_helpers.py client cassandra HOST 9042"]}
    note = ("cassandra-driver: protocol negotiation (v5 offered, server answers), OPTIONS/SUPPORTED, STARTUP, "
            "AUTHENTICATE/AUTH_RESPONSE/AUTH_SUCCESS (PasswordAuthenticator, user cassandra), the control "
            "connection's system queries, then CREATE KEYSPACE/TABLE, INSERT, SELECT.")
    return [Made("cassandra-driver", made_by, note + " IPv4.", "cassandra"),
            Made("cassandra-driver-ipv6", made_by, note + " IPv6.", "cassandra", ["ipv6"])]


# ---------------------------------------------------------------------------- mongodb (mongo-java-server)

MONGO_JAVA_SERVER = "1.47.0"
_MONGO_LAUNCHER = """import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.ServerVersion;
import de.bwaldvogel.mongo.backend.memory.MemoryBackend;

public class MongoLauncher {
    public static void main(String[] args) throws Exception {
        MongoServer server = new MongoServer(new MemoryBackend().version(ServerVersion.MONGO_5_0));
        server.bind(args[0], Integer.parseInt(args[1]));
        Thread.currentThread().join();
    }
}
"""


@recipe
def make_mongodb(lab: Lab, tmp: Path) -> list[Made]:
    lib = maven_jars(f"mongo-java-server-{MONGO_JAVA_SERVER}",
                     [("de.bwaldvogel", "mongo-java-server", MONGO_JAVA_SERVER), ("org.slf4j", "slf4j-simple", "2.0.16")])
    (tmp / "MongoLauncher.java").write_text(_MONGO_LAUNCHER)
    lab.server(["java", "-Xmx256m", "-cp", f"{lib}/*", str(tmp / "MongoLauncher.java"), "::", "27017"], log="mongo.log")
    lab.wait_listen(27017, timeout=120)
    with lab.capture(out("mongodb", "pymongo")):
        lab.client(helper("client", "mongodb", S4, "27017"), timeout=60)
    with lab.capture(out("mongodb", "pymongo-ipv6")):
        lab.client(helper("client", "mongodb", S6, "27017"), timeout=60)
    made_by = {"server": f"mongo-java-server {MONGO_JAVA_SERVER} (de.bwaldvogel, from Maven Central; an open-source "
                         "server speaking the MongoDB wire protocol, in-memory backend; not MongoDB itself, whose "
                         "server no registry here carries), " + version_of(["java", "-version"]),
               "client": f"{pip_version('pymongo')}, {PY_NOTE}",
               "commands": ["java -cp mongo-java-server-1.47.0/* MongoLauncher.java :: 27017",
                            "capture_helpers.py client mongodb HOST 27017"]}
    note = ("pymongo: connection handshake, ping, insert_one, find, endSessions; two connections (the "
            "monitor and the pool).")
    return [Made("pymongo", made_by, note + " IPv4.", "mongodb", ["wire-compatible-server"]),
            Made("pymongo-ipv6", made_by, note + " IPv6.", "mongodb", ["wire-compatible-server", "ipv6"])]


# ---------------------------------------------------------------------------- answering listeners


def listener_recipe(proto: str, port: int, client_dist: str, what: str) -> Recipe:
    def make(lab: Lab, tmp: Path) -> list[Made]:
        lab.server(helper("serve", proto, str(port)), log=f"{proto}.log")
        lab.wait_listen(port)
        with lab.capture(out(proto, f"{proto}-listener")):
            lab.client(helper("client", proto, S4, str(port)), timeout=120)
        with lab.capture(out(proto, f"{proto}-listener-ipv6")):
            lab.client(helper("client", proto, S6, str(port)), timeout=120)
        made_by = {"server": f"ANSWERING LISTENER capture_helpers.py serve {proto} {port} (no real server can run here): {what}",
                   "client": f"{pip_version(client_dist)}, {PY_NOTE} (real client library)",
                   "commands": [f"capture_helpers.py serve {proto} {port}", f"capture_helpers.py client {proto} HOST {port}"]}
        note = f"Real {client_dist} client against a listener that answers with the protocol's real replies: {what}"
        return [Made(f"{proto}-listener", made_by, note + " IPv4.", proto, ["answering-listener"]),
                Made(f"{proto}-listener-ipv6", made_by, note + " IPv6.", proto, ["answering-listener", "ipv6"])]
    make.__name__ = f"make_{proto}"
    return make


_TDS_WHAT = ("PRELOGIN answered (version 16.0, encryption not supported), LOGIN7 answered with ENVCHANGE, "
             "LOGINACK and DONE, SQL batches answered with a one-column result set and DONE.")


@recipe
def make_tds(lab: Lab, tmp: Path) -> list[Made]:
    lab.server(helper("serve", "tds", "1433"), log="tds.log")
    lab.wait_listen(1433)
    with lab.capture(out("tds", "pytds-listener-ipv6")):
        lab.client(helper("client", "tds", S6, "1433"), timeout=60)
    with lab.capture(out("tds", "freetds-tsql-listener")):
        for q in ("SELECT name FROM users WHERE id = 1", "SELECT @@VERSION"):
            lab.client(["tsql", "-H", S4, "-p", "1433", "-U", "sa", "-P", "Secret-1", "-D", "shop"],
                       input=f"{q}\ngo\nexit\n", env={"TDSVER": "7.4"}, timeout=30)
    server = f"ANSWERING LISTENER capture_helpers.py serve tds 1433 (no SQL Server can run here): {_TDS_WHAT}"
    note = "Real client against a listener that answers with TDS 7.4 replies: " + _TDS_WHAT
    return [
        Made("pytds-listener-ipv6", {"server": server, "client": f"{pip_version('python-tds')}, {PY_NOTE} (real client library)",
                                     "commands": ["capture_helpers.py serve tds 1433", "capture_helpers.py client tds fd00:199::1 1433"]},
             note + " Two python-tds sessions over IPv6.", "tds", ["answering-listener", "ipv6"]),
        Made("freetds-tsql-listener", {"server": server, "client": f"FreeTDS tsql ({deb_version('freetds-bin')}), TDSVER=7.4",
                                       "commands": ["capture_helpers.py serve tds 1433",
                                                    f"TDSVER=7.4 tsql -H {S4} -p 1433 -U sa -P ... -D shop <<< 'QUERY\\ngo'"]},
             note + " Two FreeTDS tsql sessions over IPv4 (FreeTDS takes no IPv6 literal).", "tds", ["answering-listener"]),
    ]
RECIPES["tns"] = listener_recipe(
    "tns", 1521, "oracledb",
    "thin-mode CONNECT for service FLOWMAP answered with ACCEPT (TNS version 317, SDU 8192), the client's "
    "first DATA packet read, then the connection closed; CONNECT for service ORCLPDB1 answered with a listener "
    "REFUSE (ERR=12514, unknown service), as an Oracle listener answers.")


# ---------------------------------------------------------------------------- threats
# Directories named after the threat (flowmap_api.threats); each flow's label is its protocol and
# its "threats" the hits it must raise (none in the benign captures, the closest benign cases).

OLD_TLS = "DEFAULT:@SECLEVEL=0"  # OpenSSL 3 refuses TLS 1.0/1.1 (SHA-1 signatures) above level 0


def _openssl_server(lab: Lab, tmp: Path, key: str, *extra: str) -> str:
    """``openssl s_server -www`` on port 443 of both addresses, with a fresh self-signed certificate
    (``key``: ``ec`` or ``rsa``); returns the server's description."""
    keyopt = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if key == "ec" else ["-newkey", "rsa:2048"]
    run(["openssl", "req", "-x509", *keyopt, "-nodes", "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem"),
         "-days", "2", "-subj", "/CN=vulnerable.flowmap.test"])
    for addr in (S4, f"[{S6}]"):
        lab.server(["openssl", "s_server", "-accept", f"{addr}:443", "-cert", str(tmp / "cert.pem"),
                    "-key", str(tmp / "key.pem"), "-www", *extra], log="s_server.log")
    lab.wait_listen(443)
    return f"openssl s_server, {version_of(['openssl', 'version'])} ({deb_version('openssl')})"


@recipe
def make_deprecated_tls(lab: Lab, tmp: Path) -> list[Made]:
    server = _openssl_server(lab, tmp, "ec", "-cipher", OLD_TLS)
    req = "GET / HTTP/1.0\r\nHost: old.flowmap.test\r\n\r\n"
    old = [["-tls1"], ["-tls1_1"]]
    offered = [["-min_protocol", "TLSv1"], ["-min_protocol", "TLSv1", "-no_tls1_3"]]
    with lab.capture(out("deprecated-tls", "openssl-tls1-tls1_1")):
        for v in old:
            lab.client(["openssl", "s_client", "-connect", f"{S4}:443", "-servername", "old.flowmap.test", "-ign_eof",
                        "-cipher", OLD_TLS, *v], input=req)
    with lab.capture(out("deprecated-tls", "openssl-old-offered-ipv6")):
        for v in offered:
            lab.client(["openssl", "s_client", "-connect", f"[{S6}]:443", "-servername", "old.flowmap.test",
                        "-ign_eof", "-cipher", OLD_TLS, *v], input=req)
    client = f"openssl s_client, {version_of(['openssl', 'version'])}"
    cmd = f"openssl s_client -servername old.flowmap.test -cipher '{OLD_TLS}'"
    return [
        Made("openssl-tls1-tls1_1", {"server": server + f" -cipher '{OLD_TLS}'", "client": client,
                                     "commands": [f"openssl s_server -accept ADDR:443 -www -cipher '{OLD_TLS}'",
                                                  f"{cmd} -connect {S4}:443 -tls1",
                                                  f"{cmd} -connect {S4}:443 -tls1_1"]},
             "Two TLS sessions over IPv4 that negotiate TLS 1.0 and TLS 1.1 (ServerHello version 0x0301, 0x0302), "
             "one HTTP GET each: deprecated-tls.", "tls", ["threat"], threats=lambda i, f: ["deprecated-tls"]),
        Made("openssl-old-offered-ipv6", {"server": server + f" -cipher '{OLD_TLS}'", "client": client,
                                          "commands": [f"{cmd} -connect [{S6}]:443 -min_protocol TLSv1",
                                                       f"{cmd} -connect [{S6}]:443 -min_protocol TLSv1 -no_tls1_3"]},
             "The closest benign case: two TLS sessions over IPv6 whose client offers TLS 1.0 and up (and an "
             "old-style ClientHello), but whose server chooses TLS 1.3, then TLS 1.2: no threat.",
             "tls", ["threat", "benign", "ipv6"]),
    ]


@recipe
def make_heartbleed(lab: Lab, tmp: Path) -> list[Made]:
    server = _openssl_server(lab, tmp, "rsa")
    with lab.capture(out("heartbleed", "python-heartbleed")):
        lab.client(helper("client", "heartbeat", S4, "443", "malicious"))
    with lab.capture(out("heartbleed", "python-heartbeat-benign-ipv6")):
        lab.client(helper("client", "heartbeat", S6, "443", "benign"))
    client = f"capture_helpers.py client heartbeat (raw socket, {PY_NOTE})"
    what = ("a raw-socket client sends a TLS 1.2 ClientHello with the heartbeat extension (as an OpenSSL 1.0.1 "
            "client's), reads the real server's ServerHello, Certificate, ServerKeyExchange and ServerHelloDone, "
            "then, unencrypted, a heartbeat request ")
    return [
        Made("python-heartbleed", {"server": server, "client": client,
                                   "commands": ["openssl s_server -accept ADDR:443 -www (self-signed RSA cert)",
                                                f"capture_helpers.py client heartbeat {S4} 443 malicious"]},
             "Two Heartbleed probes over IPv4 (no real client makes one; OpenSSL 3 has no heartbeat support, so the "
             "server answers with an alert instead of leaking): " + what + "of 3 bytes claiming 16384 bytes of "
             "payload: heartbleed.", "tls", ["threat", "crafted-client"], threats=lambda i, f: ["heartbleed"]),
        Made("python-heartbeat-benign-ipv6", {"server": server, "client": client,
                                              "commands": [f"capture_helpers.py client heartbeat {S6} 443 benign"]},
             "The closest benign case, over IPv6: " + what + "whose claimed payload length (17) is what it carries, "
             "with 16 bytes of padding: no threat. (No real client sends heartbeats here: Debian's OpenSSL 3 was "
             "built without them, and s_client has no 'B' command.)", "tls",
             ["threat", "benign", "crafted-client", "ipv6"]),
    ]


@recipe
def make_http_smuggling(lab: Lab, tmp: Path) -> list[Made]:
    start_http(lab, tmp)
    curl = ["curl", "-sS", "-o", "/dev/null"]
    with lab.capture(out("http-smuggling", "smuggling-raw-and-curl")):
        lab.client(helper("client", "smuggling", S4, "80"))
        lab.client([*curl, "-H", "Transfer-Encoding: chunked", "-H", "Content-Length: 6", "--data-binary", "@-",
                    f"http://{S4}/upload"], input="0\r\n\r\nGET /admin HTTP/1.1\r\nHost: web\r\n\r\n", check=False)
    payload = tmp / "upload.json"
    payload.write_text('{"items": [' + ", ".join(str(i) for i in range(200)) + "]}\n")
    with lab.capture(out("http-smuggling", "curl-chunked-and-sized-ipv6")):
        base = f"http://[{S6}]"
        lab.client([*curl, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{payload}", f"{base}/upload"],
                   check=False)
        lab.client([*curl, "-T", "-", f"{base}/put.txt"], input="streamed from stdin, chunked\n" * 20, check=False)
        lab.client([*curl, "--data-binary", f"@{payload}", f"{base}/upload"], check=False)
        lab.client([*curl, "-d", "name=flowmap&kind=test", f"{base}/form"], check=False)
    server = f"python -m http.server ({PY_NOTE})"
    client = version_of(["curl", "--version"])
    return [
        Made("smuggling-raw-and-curl", {"server": server, "client": f"{client}; capture_helpers.py client smuggling "
                                                                    f"(raw socket, {PY_NOTE})",
                                        "commands": [f"capture_helpers.py client smuggling {S4} 80",
                                                     "curl -H 'Transfer-Encoding: chunked' -H 'Content-Length: 6' "
                                                     f"--data-binary @- http://{S4}/upload"]},
             "Eight HTTP/1.1 POSTs over IPv4, each carrying a smuggled GET after a chunked terminator: seven written "
             "raw (Content-Length with Transfer-Encoding, two Content-Lengths, Content-Length -1, "
             "'Transfer-Encoding: xchunked', a vertical tab before 'chunked', Transfer-Encoding twice, "
             "'Transfer-Encoding :'), one by curl with both headers: http-smuggling. The server answers 501.",
             "http", ["threat"], threats=lambda i, f: ["http-smuggling"]),
        Made("curl-chunked-and-sized-ipv6", {"server": server, "client": client,
                                             "commands": ["curl -H 'Transfer-Encoding: chunked' --data-binary @FILE "
                                                          f"http://[{S6}]/upload",
                                                          "curl -T - URL (stdin: chunked)",
                                                          "curl --data-binary @FILE URL", "curl -d name=... URL"]},
             "The closest benign cases, over IPv6: two chunked uploads (a file and stdin) and two POSTs with a "
             "Content-Length, by curl: no threat.", "http", ["threat", "benign", "ipv6"]),
    ]


SLOW_LIMIT = "slowloris.seconds=2"  # the captures stay short: judged with a 2 s limit, not the default 10 s


@recipe
def make_slowloris(lab: Lab, tmp: Path) -> list[Made]:
    start_http(lab, tmp)
    with lab.capture(out("slowloris", "python-slowloris")):
        lab.client(helper("client", "slowloris", S4, "80", "4", "1.0"))
    with lab.capture(out("slowloris", "python-split-request-ipv6")):
        lab.client(helper("client", "split_request", S6, "80"))
    server = f"python -m http.server ({PY_NOTE})"
    client = f"capture_helpers.py (raw socket, {PY_NOTE})"
    return [
        Made("python-slowloris", {"server": server, "client": client,
                                  "commands": [f"capture_helpers.py client slowloris {S4} 80 4 1.0"]},
             "One Slowloris connection over IPv4: a GET's request line and Host header, then one more header "
             "line a second for four seconds, never the blank line; the client then closes. Judged with "
             f"{SLOW_LIMIT}: slowloris.", "http", ["threat"], threats=lambda i, f: ["slowloris"], threat_limits=[SLOW_LIMIT]),
        Made("python-split-request-ipv6", {"server": server, "client": client,
                                           "commands": [f"capture_helpers.py client split_request {S6} 80"]},
             "The closest benign case, over IPv6: an ordinary GET written in five pieces 50 ms apart (TCP_NODELAY), "
             f"answered 200. Judged with {SLOW_LIMIT}: no threat.", "http", ["threat", "benign", "ipv6"],
             threat_limits=[SLOW_LIMIT]),
    ]


# ---------------------------------------------------------------------------- threats: DNS

def named(name: str) -> Callable[[Recipe], Recipe]:
    """Register a recipe under a name that is no Python identifier (a threat's, with dashes)."""
    def register(fn: Recipe) -> Recipe:
        RECIPES[name] = fn
        return fn
    return register


# 300 bytes of base32 in one TXT record, in two strings: what a tunnel's downstream looks like.
_TUNNEL_TXT = '"' + "mfrggzdfmztwq2lknnwg23tpobyxe43uov3ho6dzpiydcmrtgq2tmnzyhe" * 3 + '" "' + \
    "nbswy3dpeb3w64tmmqqgc3tpnzsxi2dj" * 4 + '"'
# A real 2048-bit DKIM key record's shape: tags, spaces, then ~400 base64 characters in two strings.
_DKIM_TXT = '"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA' + "q7Xn2Ybt4VQfW3kZ8pRz" * 9 + \
    '" "' + "Hj5Lm0Pq9Rs2Tu4Vw6Xy8Za1Bc3De5Fg" * 5 + 'IDAQAB"'
_ZONE = """$ORIGIN flowmap.test.
$TTL 300
@        SOA   ns1 hostmaster 2024060101 3600 600 86400 300
@        NS    ns1
ns1      A     10.199.0.1
api      A     10.199.0.81
api      AAAA  fd00:199::81
www      CNAME api
@        MX    10 mail
mail     A     10.199.0.25
@        TXT   "v=spf1 ip4:10.199.0.0/24 include:_spf.flowmap.test -all"
_dmarc   TXT   "v=DMARC1; p=reject; rua=mailto:dmarc@flowmap.test"
sel1._domainkey TXT {dkim}
{tunnel}*.w      A     10.199.0.98
*.edge-cache-frontend-europe-west4-production.cdn A 10.199.0.97
"""


def start_nsd(lab: Lab, tmp: Path, tunnel: bool) -> str:
    """NSD, authoritative for flowmap.test (IPv4 and IPv6, port 53), zone transfers allowed to anyone;
    with ``tunnel``, names under t.flowmap.test answer a 300-byte TXT record of base32."""
    records = f"*.t      TXT   {_TUNNEL_TXT}\n*.t      A     10.199.0.99\n" if tunnel else ""
    (tmp / "flowmap.test.zone").write_text(_ZONE.format(dkim=_DKIM_TXT, tunnel=records))
    (tmp / "nsd.conf").write_text(f"""server:
  ip-address: {S4}
  ip-address: {S6}
  port: 53
  username: ""
  chroot: ""
  zonesdir: "{tmp}"
  database: ""
  pidfile: "{tmp}/nsd.pid"
  xfrdfile: "{tmp}/xfrd.state"
  zonelistfile: "{tmp}/zone.list"
  verbosity: 2
remote-control:
  control-enable: no
zone:
  name: flowmap.test
  zonefile: "{tmp}/flowmap.test.zone"
  provide-xfr: 0.0.0.0/0 NOKEY
  provide-xfr: ::0/0 NOKEY
""")
    run(["nsd-checkconf", str(tmp / "nsd.conf")])
    lab.server(["nsd", "-d", "-c", str(tmp / "nsd.conf")], log="nsd.log")
    lab.wait_listen(53, udp=True)
    lab.wait_listen(53)
    return version_of(["nsd", "-v"]) + f" ({deb_version('nsd')})"


def _dig() -> str:
    return version_of(["dig", "-v"]) + f" ({deb_version('bind9-dnsutils')})"


_B32 = "onswg4tfoqqgc5dupjsxgidnmfuw4idimfzsa43fmnzgk5dtfyqhi2dfebrwe5lmmqqg"  # base32 of text, 68 chars
_HEX = hashlib.sha256(b"flowmap dns-tunnel capture").hexdigest()  # 64 random-looking hex digits, as encrypted data
UNIQUE_NAMES = 150  # dnstunnel's default unique_names


@named("dns-tunnel")
def make_dns_tunnel(lab: Lab, tmp: Path) -> list[Made]:
    nsd = start_nsd(lab, tmp, tunnel=True)
    tunnel = [[f"{_B32[:56]}.{_B32[12:68]}.t.flowmap.test", "TXT"], [f"{_HEX[:60]}.t.flowmap.test", "A"],
              ["abc.t.flowmap.test", "TXT"]]
    with lab.capture(out("dns-tunnel", "dig-tunnel-names")):
        for name, qtype in tunnel:
            lab.client(["dig", f"@{S4}", name, qtype, "+tries=1", "+time=2"])
        lab.client(helper("client", "dns_big_query", S4, "53", "api.flowmap.test"))
    n_names = UNIQUE_NAMES + 10
    with lab.capture(out("dns-tunnel", "dnspython-many-names")):
        lab.client(helper("client", "dns_names", S4, "53", "w.flowmap.test", str(n_names)), timeout=120)
    benign = [["sel1._domainkey.flowmap.test", "TXT"], ["flowmap.test", "TXT"], ["_dmarc.flowmap.test", "TXT"],
              ["api.flowmap.test.kube-system.svc.cluster.local", "A"], ["api.flowmap.test.svc.cluster.local", "A"],
              ["img-17.edge-cache-frontend-europe-west4-production.cdn.flowmap.test", "A"],
              ["www.flowmap.test", "AAAA"]]
    with lab.capture(out("dns-tunnel", "dig-benign-ipv6")):
        for name, qtype in benign:
            lab.client(["dig", f"@{S6}", name, qtype, "+tries=1", "+time=2"])
        lab.client(helper("client", "dns_names", S6, "53", "w.flowmap.test", str(UNIQUE_NAMES // 2)), timeout=120)
    # A real tunnel: iodine (Debian's), NULL queries through the tunnel server itself on port 53.
    nsd_proc = lab.servers.pop()
    nsd_proc.terminate()
    nsd_proc.wait(10)
    lab.server(["iodined", "-f", "-c", "-P", "flowmap-tunnel", "-l", S4, "-p", "53", "10.50.0.1", "t2.flowmap.test"],
               log="iodined.log")
    lab.wait_listen(53, udp=True)
    iodine_cmd = ["iodine", "-f", "-r", "-P", "flowmap-tunnel", S4, "t2.flowmap.test"]
    with lab.capture(out("dns-tunnel", "iodine")):
        with open(tmp / "iodine.log", "wb") as log:
            client = subprocess.Popen(["ip", "netns", "exec", lab.ns_c, *iodine_cmd], stdout=log, stderr=log)
            lab.procs.append(client)
            _wait_text(tmp / "iodine.log", "Connection setup complete", 60)
            lab.client(["ping", "-c", "3", "-W", "2", "10.50.0.1"], check=False)
            client.terminate()
            client.wait(10)
    server = nsd + ", authoritative for flowmap.test (wildcard TXT of 300 bytes under t.flowmap.test)"
    iodine = version_of(["iodine", "-v"]) + f" ({deb_version('iodine')})"
    return [
        Made("iodine", {"server": f"iodined, {iodine}", "client": f"iodine, {iodine}",
                        "commands": [f"iodined -f -c -P ... -l {S4} -p 53 10.50.0.1 t2.flowmap.test",
                                     " ".join(iodine_cmd).replace("flowmap-tunnel", "..."),
                                     "ping -c 3 10.50.0.1 (through the tunnel)"]},
             "A real DNS tunnel over IPv4: iodine's handshake (version, login, codec and fragment-size probes in "
             "NULL queries with Base128 names of ~250 characters) and three pings through the tunnel, one UDP "
             "flow. dns-tunnel.", "dns", ["threat"], threats=lambda i, f: ["dns-tunnel"]),
        Made("dig-tunnel-names", {"server": server, "client": _dig() + f"; {pip_version('dnspython')}",
                                  "commands": [*(f"dig @{S4} {n} {t}" for n, t in tunnel),
                                               "capture_helpers.py client dns_big_query 10.199.0.1 53 "
                                               "api.flowmap.test"]},
             "Tunnel-like DNS over IPv4: two 56-character base32 labels (TXT, answered with 300 bytes of base32), "
             "a 60-character hex label, a short name answered with the same 300-byte TXT record, and one A query "
             "padded to 700 bytes with an EDNS option (dnspython). Every flow is dns-tunnel.",
             "dns", ["threat"], threats=lambda i, f: ["dns-tunnel"]),
        Made("dnspython-many-names", {"server": server, "client": f"{pip_version('dnspython')}, {PY_NOTE}",
                                      "commands": [f"capture_helpers.py client dns_names 10.199.0.1 53 w.flowmap.test "
                                                   f"{n_names}"]},
             f"{n_names} A queries for distinct 8-hex-digit names under w.flowmap.test, one socket each, within a "
             f"few seconds, over IPv4: the {UNIQUE_NAMES}th session tips the per-client watch (dns-tunnel), "
             "once; no session alone is suspicious.", "dns", ["threat"],
             threats=lambda i, f: ["dns-tunnel"] if i == UNIQUE_NAMES - 1 else []),
        Made("dig-benign-ipv6", {"server": server, "client": _dig() + f"; {pip_version('dnspython')}",
                                 "commands": [*(f"dig @{S6} {n} {t}" for n, t in benign),
                                              f"capture_helpers.py client dns_names {S6} 53 w.flowmap.test "
                                              f"{UNIQUE_NAMES // 2}"]},
             "The closest benign cases over IPv6: a DKIM key (TXT, ~450 bytes in two strings), SPF and DMARC TXT "
             "records, Kubernetes search-path expansions, a long CDN-style name, and "
             f"{UNIQUE_NAMES // 2} distinct names under one domain (half the watch's threshold). No threat.",
             "dns", ["ipv6", "benign"]),
    ]


@named("dns-zone-transfer")
def make_dns_zone_transfer(lab: Lab, tmp: Path) -> list[Made]:
    nsd = start_nsd(lab, tmp, tunnel=False)
    xfr = [[f"@{S4}", "flowmap.test", "AXFR"], [f"@{S4}", "flowmap.test", "IXFR=2024010101", "+notcp"],
           [f"@{S6}", "flowmap.test", "AXFR"]]
    with lab.capture(out("dns-zone-transfer", "dig-axfr-ixfr")):
        for args in xfr:
            lab.client(["dig", *args, "+tries=1", "+time=3"])
    plain = [[f"@{S4}", "flowmap.test", "SOA"], [f"@{S4}", "flowmap.test", "NS"],
             [f"@{S6}", "+tcp", "flowmap.test", "SOA"]]
    with lab.capture(out("dns-zone-transfer", "dig-soa-ns")):
        for args in plain:
            lab.client(["dig", *args, "+tries=1", "+time=3"])
    server = nsd + ", authoritative for flowmap.test, provide-xfr to any address"
    return [
        Made("dig-axfr-ixfr", {"server": server, "client": _dig(),
                               "commands": [f"dig {' '.join(a)}" for a in xfr]},
             "Zone transfers asked of a real authoritative server: AXFR over TCP (IPv4 and IPv6, the whole zone "
             "sent back) and IXFR over UDP (answered with the SOA).", "dns", ["threat", "ipv6"],
             threats=lambda i, f: ["dns-zone-transfer"]),
        Made("dig-soa-ns", {"server": server, "client": _dig(), "commands": [f"dig {' '.join(a)}" for a in plain]},
             "The closest benign case: SOA and NS queries of the same zone, over UDP and TCP. No threat.",
             "dns", ["ipv6", "benign"]),
    ]


# ---------------------------------------------------------------------------- threats: logins


@named("auth-brute-force")
def make_auth_brute_force(lab: Lab, tmp: Path) -> list[Made]:
    my = start_mariadb(lab, tmp)
    pg = start_postgres(lab, tmp) + f" ({deb_version('postgresql-15')})"
    lab.server(["redis-server", "--bind", S4, S6, "--port", "6379", "--save", "", "--appendonly", "no",
                "--requirepass", "secret", "--dir", str(tmp), "--daemonize", "no"], log="redis.log")
    lab.wait_listen(6379)
    rd = deb_version("redis-server") + " (--requirepass)"
    made = []
    for proto, port, server, dist in (("mysql", 3306, my, "PyMySQL"), ("postgresql", 5432, pg, "psycopg"),
                                      ("redis", 6379, rd, "redis")):
        with lab.capture(out("auth-brute-force", f"{proto}-guess")):
            lab.client(helper("client", "login", proto, S4, str(port), "guess"), timeout=120)
        with lab.capture(out("auth-brute-force", f"{proto}-typo-ipv6")):
            lab.client(helper("client", "login", proto, S6, str(port), "typo"), timeout=60)
        client = f"{pip_version(dist)}, {PY_NOTE}"
        made += [
            Made(f"{proto}-guess", {"server": server, "client": client,
                                    "commands": [f"capture_helpers.py client login {proto} {S4} {port} guess"]},
                 f"Twelve {dist} logins with wrong passwords to a real server, one connection each, 0.3 s apart, "
                 "over IPv4: the tenth refusal tips auth-brute-force, once.", proto, ["threat"],
                 threats=lambda i, f: ["auth-brute-force"] if i == 9 else []),
            Made(f"{proto}-typo-ipv6", {"server": server, "client": client,
                                        "commands": [f"capture_helpers.py client login {proto} {S6} {port} typo"]},
                 f"The closest benign case over IPv6: one {dist} login with a mistyped password, then the right one. "
                 "No threat.", proto, ["ipv6", "benign"]),
        ]
    return made


# ---------------------------------------------------------------------------- threats: MongoDB operator injection


@named("sqlinjection-mongodb")
def make_sqlinjection_mongodb(lab: Lab, tmp: Path) -> list[Made]:
    lib = maven_jars(f"mongo-java-server-{MONGO_JAVA_SERVER}", [("de.bwaldvogel", "mongo-java-server", MONGO_JAVA_SERVER),
                                                                ("org.slf4j", "slf4j-simple", "2.0.16")])
    (tmp / "MongoLauncher.java").write_text(_MONGO_LAUNCHER)
    lab.server(["java", "-Xmx256m", "-cp", f"{lib}/*", str(tmp / "MongoLauncher.java"), "::", "27017"], log="mongo.log")
    lab.wait_listen(27017, timeout=120)
    with lab.capture(out("sqlinjection-mongodb", "pymongo-inject")):
        lab.client(helper("client", "mongodb_queries", S4, "27017", "inject"), timeout=60)
    with lab.capture(out("sqlinjection-mongodb", "pymongo-operators-ipv6")):
        lab.client(helper("client", "mongodb_queries", S6, "27017", "benign"), timeout=60)
    server = (f"mongo-java-server {MONGO_JAVA_SERVER} (de.bwaldvogel, from Maven Central; a server speaking the "
              "MongoDB wire protocol, in-memory backend; not MongoDB itself), " + version_of(["java", "-version"]))
    client = f"{pip_version('pymongo')}, {PY_NOTE}"
    # pymongo opens its monitoring connection (hello only) before the pool's, which carries the finds.
    return [
        Made("pymongo-inject", {"server": server, "client": client,
                                "commands": ["capture_helpers.py client mongodb_queries 10.199.0.1 27017 inject"]},
             'pymongo over IPv4: insert_one, then find({"user": "admin", "password": {"$ne": null}}), a login '
             "filter with an operator object where the password string belongs. The carrying protocol is mongodb.",
             "mongodb", ["mongodb", "threat", "wire-compatible-server"],
             threats=lambda i, f: ["sqlinjection"] if i else []),
        Made("pymongo-operators-ipv6", {"server": server, "client": client,
                                        "commands": [f"capture_helpers.py client mongodb_queries {S6} 27017 benign"]},
             'The closest benign case, pymongo over IPv6: find({"age": {"$gt": 30}}), find({"deletedAt": {"$ne": '
             'null}, "user": {"$in": [...]}}), find({"user": "admin", "password": "s3cret"}). No threat.',
             "mongodb", ["mongodb", "ipv6", "benign", "wire-compatible-server"]),
    ]



# ---------------------------------------------------------------------------- threats: icmp


def _echo_threats(which: dict[str, list[str]]) -> Callable[[int, dict[str, object]], list[str]]:
    """Threats by flow protocol (icmp, icmpv6, tcp, udp): what every such flow raises."""
    return lambda i, f: which.get(str(f["proto"]), [])


@recipe
def make_icmp(lab: Lab, tmp: Path) -> list[Made]:
    """Real pings (benign, whatever their size and pattern) and a real ICMP tunnel (ptunnel-ng)."""
    pings4 = [["-c", "3", "-i", "0.2", S4], ["-c", "3", "-i", "0.2", "-s", "1472", S4],
              ["-c", "3", "-i", "0.2", "-s", "1472", "-p", "ff00", S4], ["-c", "2", "-i", "0.3", "-s", "4000", S4]]
    pings6 = [["-6", "-c", "3", "-i", "0.2", S6], ["-6", "-c", "3", "-i", "0.2", "-s", "1452", S6],
              ["-6", "-c", "3", "-i", "0.2", "-s", "1452", "-p", "a5", S6]]
    with lab.capture(out("icmp", "ping"), Lab.ECHOES):
        for args in pings4:
            lab.client(["ping", "-n", *args])
    with lab.capture(out("icmp", "ping-ipv6"), Lab.ECHOES):
        for args in pings6:
            lab.client(["ping", "-n", *args])
    # ptunnel-ng: the proxy in the server namespace forwards a TCP connection carried in echoes to
    # its own sshd-like target, here a TCP echo server on 127.0.0.1:7; the client forwards a local
    # port. The kernel's own echo replies are turned off in the proxy's namespace, as ptunnel-ng's
    # documentation advises.
    lab.sh(lab.ns_s, ["sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1"])
    lab.server(["socat", "TCP4-LISTEN:7,bind=127.0.0.1,fork,reuseaddr", "PIPE"], log="tunnel-target.log")
    lab.server(["ptunnel-ng", "-r127.0.0.1", "-R7", "-v1", f"-o{tmp / 'ptunnel-proxy.log'}"], log="ptunnel-proxy.out")
    lab.wait_listen(7)
    text = "tunnelled through ICMP echoes " * 20
    with lab.capture(out("icmp", "ptunnel-ng"), Lab.ECHOES):
        lab.background_client(["ptunnel-ng", f"-p{S4}", "-l2222", "-r127.0.0.1", "-R7", "-v1",
                               f"-o{tmp / 'ptunnel-client.log'}"], log="ptunnel-client.out")
        deadline = time.monotonic() + 20
        while not lab.sh(lab.ns_c, ["ss", "-Hltn", "sport = :2222"], check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError("ptunnel-ng's client does not listen on 2222")
            time.sleep(0.2)
        # Stdin stays open until the echo is back: ptunnel-ng ends its session on a half-close.
        echoed = lab.client(["sh", "-c", f"(printf '%s\\n' '{text}'; sleep 3) | socat -t 2 - TCP4:127.0.0.1:2222"]).stdout
        if text not in echoed:
            raise RuntimeError(f"the tunnel did not echo: {echoed[:200]!r}")
        time.sleep(1.5)
    iputils = version_of(["ping", "-V"])
    return [
        Made("ping", {"server": "the Linux kernel's echo replies", "client": iputils,
                      "commands": ["ping -n " + " ".join(a) for a in pings4]},
             "Four ping runs over IPv4: default size, -s 1472 (a full 1,500-byte frame), -s 1472 -p ff00, and "
             "-s 4000 (fragmented both ways). Benign: no icmp-tunnel whatever the size.", "unknown", ["threats"]),
        Made("ping-ipv6", {"server": "the Linux kernel's echo replies", "client": iputils,
                           "commands": ["ping -n " + " ".join(a) for a in pings6]},
             "Three ping runs over IPv6: default size, -s 1452 (a full 1,500-byte frame), -s 1452 -p a5. Benign.",
             "unknown", ["threats", "ipv6"]),
        Made("ptunnel-ng", {"server": f"ptunnel-ng proxy ({deb_version('ptunnel-ng')}), its target "
                                      f"socat TCP4-LISTEN:7,bind=127.0.0.1 PIPE",
                            "client": f"ptunnel-ng client ({deb_version('ptunnel-ng')}) and socat",
                            "commands": ["sysctl -w net.ipv4.icmp_echo_ignore_all=1 (proxy namespace)",
                                         "ptunnel-ng -r127.0.0.1 -R7", f"ptunnel-ng -p {S4} -l 2222 -r127.0.0.1 -R7",
                                         "(printf TEXT; sleep 3) | socat -t 2 - TCP4:127.0.0.1:2222"]},
             "A real ICMP tunnel: ptunnel-ng carries a TCP connection (a line of text to an echo server and back) "
             "in echo requests and its proxy's echo replies.", "unknown", ["threats"],
             threats=_echo_threats({"icmp": ["icmp-tunnel"]})),
    ]


# ---------------------------------------------------------------------------- threats: tcp fast open


@recipe
def make_tfo(lab: Lab, tmp: Path) -> list[Made]:
    """Real TCP Fast Open (curl --tcp-fastopen against Python's http.server with TCP_FASTOPEN):
    with a cookie (benign), and Linux's cookieless mode, data in a SYN without any cookie."""
    lab.sh(lab.ns_s, ["sysctl", "-qw", "net.ipv4.tcp_fastopen=3"])
    lab.sh(lab.ns_c, ["sysctl", "-qw", "net.ipv4.tcp_fastopen=1"])
    lab.server(helper("serve", "tfo_http", "80"), log="tfo-http.log")
    lab.wait_listen(80)
    get = ["curl", "-s", "--tcp-fastopen", "-o", "/dev/null", "-w", "%{http_code}\\n"]
    with lab.capture(out("tfo", "curl-cookie")):
        # The first connection asks for a cookie; the next two send their request in the SYN.
        for url in (f"http://{S4}/first", f"http://{S4}/second", f"http://[{S6}]/first", f"http://[{S6}]/second"):
            lab.client([*get, url])
    lab.sh(lab.ns_s, ["sysctl", "-qw", "net.ipv4.tcp_fastopen=515"])  # 0x203: server, no cookie needed
    lab.sh(lab.ns_c, ["sysctl", "-qw", "net.ipv4.tcp_fastopen=5"])  # 0x5: client, data without a cookie
    with lab.capture(out("tfo", "curl-no-cookie")):
        for url in (f"http://{S4}/nocookie", f"http://[{S6}]/nocookie"):
            lab.client([*get, url])
    curl = deb_version("curl")
    server = f"Python http.server with TCP_FASTOPEN ({PY_NOTE}), Linux {os.uname().release}"
    return [
        Made("curl-cookie", {"server": server + ", net.ipv4.tcp_fastopen=3", "client": curl + ", tcp_fastopen=1",
                             "commands": ["capture_helpers.py serve tfo_http 80",
                                          "curl --tcp-fastopen http://HOST/first; curl --tcp-fastopen http://HOST/second "
                                          "(IPv4, then IPv6)"]},
             "TCP Fast Open as designed: each first connection asks for a cookie (an empty option 34 in its SYN), "
             "each second sends its GET in the SYN with the cookie. Benign: no syn-with-data.", "http",
             ["threats", "ipv6"]),
        Made("curl-no-cookie", {"server": server + ", net.ipv4.tcp_fastopen=0x203 (no cookie needed)",
                                "client": curl + ", net.ipv4.tcp_fastopen=0x5 (data without a cookie)",
                                "commands": ["sysctl -w net.ipv4.tcp_fastopen=515 (server), =5 (client)",
                                             "curl --tcp-fastopen http://HOST/nocookie (IPv4, then IPv6)"]},
             "Linux's cookieless Fast Open: the GET rides the SYN with no cookie option, which the wire cannot tell "
             "from a crafted SYN with data: syn-with-data.", "http", ["threats", "ipv6"],
             threats=_echo_threats({"tcp": ["syn-with-data"]})),
    ]


# ---------------------------------------------------------------------------- threats: crafted


@recipe
def make_crafted(lab: Lab, tmp: Path) -> list[Made]:
    """What no real client here makes, built with scapy and written as a capture (no namespace
    needed): a split handshake, echo replies unlike their requests, a ping of death; each beside
    its closest benign case."""
    from scapy.layers.inet import ICMP, IP, TCP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    t0 = 1_700_000_000.0

    def stamp(pkts: list[object]) -> list[object]:
        for i, p in enumerate(pkts):
            p.time = t0 + i * 0.001  # type: ignore[attr-defined]
        return pkts

    eth = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")
    back = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    get = b"GET / HTTP/1.1\r\nHost: web.flowmap.test\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def handshake(sport: int, split: bool) -> list[object]:
        c, s = eth / IP(src=C4, dst=S4), back / IP(src=S4, dst=C4)
        pkts = [c / TCP(sport=sport, dport=80, flags="S", seq=1000)]
        if split:  # the server answers with a SYN of its own, the client with a SYN-ACK
            pkts += [s / TCP(sport=80, dport=sport, flags="S", seq=5000),
                     c / TCP(sport=sport, dport=80, flags="SA", seq=1000, ack=5001),
                     s / TCP(sport=80, dport=sport, flags="A", seq=5001, ack=1001)]
        else:
            pkts += [s / TCP(sport=80, dport=sport, flags="SA", seq=5000, ack=1001),
                     c / TCP(sport=sport, dport=80, flags="A", seq=1001, ack=5001)]
        return pkts + [c / TCP(sport=sport, dport=80, flags="PA", seq=1001, ack=5001) / get,
                       s / TCP(sport=80, dport=sport, flags="PA", seq=5001, ack=1001 + len(get)) / ok,
                       c / TCP(sport=sport, dport=80, flags="FA", seq=1001 + len(get), ack=5001 + len(ok)),
                       s / TCP(sport=80, dport=sport, flags="FA", seq=5001 + len(ok), ack=1002 + len(get)),
                       c / TCP(sport=sport, dport=80, flags="A", seq=1002 + len(get), ack=5002 + len(ok))]

    def ping_payload(seq: int) -> bytes:  # as iputils: a timestamp, then bytes counting up
        return (int(t0) + seq).to_bytes(8, "little") + (seq * 1000).to_bytes(8, "little") + bytes(range(16, 56))

    def echoes(ident: int, unlike: bool, v6: bool) -> list[object]:
        pkts: list[object] = []
        for seq in range(1, 7):
            data = ping_payload(seq)
            answer = b"exfiltrated:%06d:" % seq + bytes(range(40)) if unlike else data
            if v6:
                pkts += [eth / IPv6(src=C6, dst=S6) / ICMPv6EchoRequest(id=ident, seq=seq, data=data),
                         back / IPv6(src=S6, dst=C6) / ICMPv6EchoReply(id=ident, seq=seq, data=answer)]
            else:
                pkts += [eth / IP(src=C4, dst=S4) / ICMP(type=8, id=ident, seq=seq) / data,
                         back / IP(src=S4, dst=C4) / ICMP(type=0, id=ident, seq=seq) / answer]
        return pkts

    def big_echo(ident: int, size: int, v6: bool) -> list[object]:
        """An echo request of ``size`` payload bytes in fragments, the first carrying the ICMP
        header; past 65,507 (IPv4) or 65,527 (IPv6) bytes its last fragment ends past what a
        datagram may hold. (Checksums are left 0 in IPv6: nothing here checks them.)"""
        data = bytes(i % 251 for i in range(size))
        if v6:
            raw = struct.pack("!BBHHH", 128, 0, 0, ident, 1) + data
            return [eth / IPv6(src=C6, dst=S6) / IPv6ExtHdrFragment(nh=58, offset=off // 8, m=int(off + 1448 < len(raw)),
                                                                    id=ident) / raw[off:off + 1448]
                    for off in range(0, len(raw), 1448)]
        raw = bytes(ICMP(type=8, id=ident, seq=1) / data)
        return [eth / IP(src=C4, dst=S4, id=ident, proto=1, frag=off // 8, flags="MF" if off + 1480 < len(raw) else 0)
                / raw[off:off + 1480] for off in range(0, len(raw), 1480)]

    split = stamp([*handshake(40001, True), *handshake(40002, False)])
    replies = stamp([*echoes(0x1111, True, False), *echoes(0x2222, False, False),
                     *echoes(0x3333, True, True), *echoes(0x4444, False, True)])
    death = stamp([*big_echo(0x0101, 65600, False), *big_echo(0x0202, 65507, False)])
    death6 = stamp([*big_echo(0x0303, 65600, True), *big_echo(0x0404, 65527, True)])
    for name, pkts in (("split-handshake", split), ("echo-replies", replies), ("ping-of-death", death),
                       ("ping-of-death-ipv6", death6)):
        path = out("crafted", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        wrpcap(str(path), pkts)
    scapy = pip_version("scapy")
    made = {"server": "none: crafted with scapy (tests only)", "client": scapy}
    return [
        Made("split-handshake", {**made, "commands": ["capture_recipes.make_crafted: handshake(40001, split=True), "
                                                      "handshake(40002, split=False)"]},
             "Two HTTP exchanges over IPv4: one whose server answers the SYN with a SYN (then SYN-ACK from the "
             "client, ACK from the server: the split handshake), one with the ordinary SYN, SYN-ACK, ACK.",
             "http", ["threats", "crafted"],
             threats=lambda i, f: ["tcp-split-handshake"] if str(f["client"]).endswith(":40001") else []),
        Made("echo-replies", {**made, "commands": ["capture_recipes.make_crafted: echoes(ident, unlike, v6)"]},
             "Six echo exchanges per session, ping-like requests (a timestamp, then a fixed pattern): sessions "
             "0x1111 (IPv4) and 0x3333 (IPv6) answered with other data (a tunnel's replies), 0x2222 and 0x4444 "
             "answered with copies of their requests (what every stack does).", "unknown",
             ["threats", "crafted", "ipv6"],
             threats=lambda i, f: ["icmp-tunnel"] if str(f["client"]).rsplit(":", 1)[1] in ("4369", "13107") else []),
        Made("ping-of-death", {**made, "commands": ["capture_recipes.make_crafted: big_echo(ident, size, v6=False)"]},
             "IPv4 echo requests in fragments: 65,600 payload bytes (the last fragment ends past 65,535: the ping "
             "of death), identifier 0x0101; and the largest legal one (65,507 bytes: a 65,535-byte datagram, "
             "what ping -s 65507 sends), 0x0202.", "unknown", ["threats", "crafted"],
             threats=lambda i, f: ["ping-of-death"] if str(f["client"]).endswith(":257") else []),
        Made("ping-of-death-ipv6", {**made, "commands": ["capture_recipes.make_crafted: big_echo(ident, size, v6=True)"]},
             "IPv6 echo requests in fragments: 65,600 payload bytes (reassembled, a payload length past 65,535), "
             "identifier 0x0303; and the largest legal one (65,527 bytes: a payload length of exactly 65,535), "
             "0x0404.", "unknown", ["threats", "crafted", "ipv6"],
             threats=lambda i, f: ["ping-of-death"] if str(f["client"]).endswith(":771") else []),
    ]


# ---------------------------------------------------------------------------- rate watches (syn-flood, scans)
# Each capture says which threats it must raise (``Made.threats``): make_captures.py classifies it
# and refuses a capture that raises others, then lists on each flow the threats it raised. A flood
# lists only its flows with a threat; the others are counted (``unlisted_flows``).

ECHO_PORT = 8080
HPING = "hping3"


def _quiet_tcp(lab: Lab) -> None:
    """No TCP timestamps: smaller frames, so more sessions fit in a small capture."""
    for ns in (lab.ns_s, lab.ns_c):
        lab.sh(ns, ["sysctl", "-qw", "net.ipv4.tcp_timestamps=0"])


@recipe
def make_syn_flood(lab: Lab, tmp: Path) -> list[Made]:
    _quiet_tcp(lab)
    # Answers to spoofed sources go back over the veth (and die in the client namespace), as they
    # would leave a node: the server holds them half-open.
    lab.sh(lab.ns_s, ["ip", "route", "add", "default", "via", C4])
    lab.server(helper("serve", "echo_lines", str(ECHO_PORT)), log="echo.log")
    lab.wait_listen(ECHO_PORT)
    server = f"capture_helpers.py serve echo_lines {ECHO_PORT} (a one-line echo, {PY_NOTE}; Linux SYN cookies on)"
    hping = deb_version("hping3")
    direct = [HPING, "-q", "-S", "-p", str(ECHO_PORT), "-c", "600", "-i", "u1000", S4]
    with lab.capture(out("syn-flood", "hping3")):
        lab.client(direct, check=False)  # hping3 exits 1 when no reply came back to it
    burst = helper("client", "burst", S4, str(ECHO_PORT), "250", "1")
    with lab.capture(out("syn-flood", "burst-completed")):
        lab.client(burst)
    # Last: the server goes on answering the spoofed sources for a while.
    spoofed = [HPING, "-q", "-S", "-p", str(ECHO_PORT), "--rand-source", "-c", "800", "-i", "u1000", S4]
    with lab.capture(out("syn-flood", "hping3-rand-source")):
        lab.client(spoofed, check=False)
    return [
        Made("hping3-rand-source", {"server": server, "client": hping, "commands": [" ".join(spoofed)]},
             "800 SYNs at 1,000/s from random spoofed sources to one listening port; the server's SYN-ACKs "
             "go unanswered (their addresses do not exist). Per-destination key: one syn-flood hit.",
             "unknown", ["syn-flood", "threat"], threats=("syn-flood",), list_flows=False),
        Made("hping3", {"server": server, "client": hping, "commands": [" ".join(direct)]},
             "600 SYNs at 1,000/s from the client's own address (a new source port each); its kernel resets "
             "each SYN-ACK. Both keys tip on one session: two syn-flood hits (to the server, from the client).",
             "unknown", ["syn-flood", "threat"], threats=("syn-flood",), list_flows=False),
        Made("burst-completed", {"server": server, "client": f"capture_helpers.py client burst ({PY_NOTE})",
                                 "commands": ["capture_helpers.py client burst 10.199.0.1 8080 250 1"]},
             "The closest benign case: 250 short connections one after another within one second, each "
             "completed (a line sent and echoed, then closed). No threat.",
             "echo", ["benign"]),
    ]


@recipe
def make_scans(lab: Lab, tmp: Path) -> list[Made]:
    _quiet_tcp(lab)
    peers = 48
    for i in range(1, peers + 1):
        lab.sh(lab.ns_s, ["ip", "addr", "add", f"10.199.1.{i}/32", "dev", lab.if_s])
    lab.sh(lab.ns_c, ["ip", "route", "add", "10.199.1.0/24", "via", S4])
    for port in (22, 80):
        lab.server(helper("serve", "many", str(port), "1"), log=f"echo{port}.log")
        lab.wait_listen(port)
    lab.server(helper("serve", "many", "9001", "40"), log="many.log")
    lab.wait_listen(9040)
    nmap = deb_version("nmap")
    server = f"capture_helpers.py serve many (one-line echoes on 22, 80 and 9001-9040, {PY_NOTE})"
    syn_scan = ["nmap", "-sS", "-Pn", "-n", "-T4", "--max-retries", "0", "-p", "1-200", S4]
    connect_scan = ["nmap", "-sT", "-Pn", "-n", "-T4", "--max-retries", "0", "-p", "1-200", S4]
    sweep = ["nmap", "-sS", "-Pn", "-n", "-T4", "--max-retries", "0", "-p", "80,8443", f"10.199.1.1-{peers}"]
    with lab.capture(out("scans", "nmap-sS-ports")):
        lab.client(syn_scan)
    with lab.capture(out("scans", "nmap-sT-ports")):
        lab.client(connect_scan)
    with lab.capture(out("scans", "nmap-sS-peers")):
        lab.client(sweep)
    with lab.capture(out("scans", "busy-client-ports")):
        lab.client(helper("client", "ports", S4, "9001", "40"))
    return [
        Made("nmap-sS-ports", {"server": server, "client": nmap, "commands": [" ".join(syn_scan)]},
             "A SYN scan of ports 1-200 of one peer: 2 open (half-open: SYN-ACK answered by a reset), "
             "198 refused. One port-scan hit.", "unknown", ["port-scan", "threat"], threats=("port-scan",)),
        Made("nmap-sT-ports", {"server": server, "client": nmap, "commands": [" ".join(connect_scan)]},
             "A connect() scan of ports 1-200 of one peer: 2 completed, 198 refused. One port-scan hit.",
             "unknown", ["port-scan", "threat"], threats=("port-scan",)),
        Made("nmap-sS-peers", {"server": server, "client": nmap, "commands": [" ".join(sweep)]},
             f"A SYN scan of ports 80 (open: half-open) and 8443 (refused) on {peers} addresses (all the "
             "server namespace's). One peer-scan hit.", "unknown", ["peer-scan", "threat"], threats=("peer-scan",)),
        Made("busy-client-ports", {"server": server, "client": f"capture_helpers.py client ports ({PY_NOTE})",
                                   "commands": ["capture_helpers.py client ports 10.199.0.1 9001 40"]},
             "The closest benign case: one client talking to 40 ports of one server, twice each, every "
             "connection completed (a line sent and echoed). No threat.", "echo", ["benign"]),
    ]


