"""One recipe per protocol: start a server in the lab's server namespace, run real clients in the
client namespace while recording, and say how (``Made.made_by``) for the manifest.

Each recipe makes two captures, usually one over IPv4 and one over IPv6 or with a second client.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from capture_lab import C4, HELPERS, PY, S4, S6, Lab, Made, deb_version, out, pip_version, run, version_of

Recipe = Callable[[Lab, Path], list[Made]]
RECIPES: dict[str, Recipe] = {}


def recipe(fn: Recipe) -> Recipe:
    RECIPES[fn.__name__.removeprefix("make_")] = fn
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


RECIPES["syn-flood"] = RECIPES.pop("syn_flood")
