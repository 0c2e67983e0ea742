//! The module `flowmap_dp._native`: the table and the decoder for `flowmap_dp.compiled`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::block::{self, Resume};
use crate::decode::{self, Addr, Decoded, Fragments, Outcome, Reason};
use crate::table::{self, Config, Event, Timeouts, END_REASONS};

const PORTS: usize = 65_536;

fn addr<'py>(py: Python<'py>, a: &Addr, v6: bool) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &a[..if v6 { 16 } else { 4 }])
}

/// A contiguous byte buffer (a ring block, a record) for the time of one call.
fn bytes_of(buf: &PyBuffer<u8>) -> PyResult<&[u8]> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer is not contiguous"));
    }
    // SAFETY: the one `unsafe` of the crate. `PyBuffer::get` checked the item type (unsigned
    // bytes) and we checked contiguity, so `len_bytes()` bytes at `buf_ptr()` are this buffer's;
    // `buf` holds the exporter's buffer (the ring's mmap, a bytes object) alive and unresized
    // for as long as the borrow of `buf` this slice lives in, which ends before the call
    // returns. Ring blocks are ours while we read them (TP_STATUS_USER): the kernel does not
    // write to a block until we hand it back, which the caller does after this call.
    Ok(unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) })
}

fn flags(ports: &[u8], what: &str) -> PyResult<Vec<bool>> {
    if ports.len() != PORTS {
        return Err(PyValueError::new_err(format!("{what}: one byte per port (65,536), got {}", ports.len())));
    }
    Ok(ports.iter().map(|&b| b != 0).collect())
}

/// The compiled session table (see `flowmap_dp.compiled.CompiledTable`, its Python face).
#[pyclass(module = "flowmap_dp._native")]
pub struct Table {
    inner: table::Table,
    resume: Option<Resume>,
    held: Option<(Decoded, f64)>,
}

impl Table {
    /// A panic in the walk: a bug (every read is checked, and the fuzz target says so), never a
    /// crash of the dp. Counted as `internal_error`; the rest of the block is not read.
    fn bug(&mut self) -> bool {
        self.inner.counters.reasons[Reason::InternalError as usize] += 1;
        self.resume = None;
        self.held = None;
        true
    }
}

#[pymethods]
impl Table {
    #[new]
    /// Ports come as 65,536 bytes each (non-zero: in the set); `new_exchange_after` by app code
    /// (the caller's codes; 256 at most, absent ones never).
    #[pyo3(signature = (max_sessions, max_pending, feed_limit, max_fragments, fragment_timeout, timeouts,
                        service_ports, udp_services, handoff_ports, handoff_remembered, new_exchange_after))]
    #[allow(clippy::too_many_arguments)]
    fn new(max_sessions: usize, max_pending: usize, feed_limit: u8, max_fragments: usize, fragment_timeout: f64,
           timeouts: Option<[f64; 7]>, service_ports: &[u8], udp_services: &[u8], handoff_ports: &[u8],
           handoff_remembered: usize, new_exchange_after: Vec<(u8, f64)>) -> PyResult<Self> {
        if max_sessions == 0 {
            return Err(PyValueError::new_err("max_sessions must be at least 1"));
        }
        let mut exchange = [f64::INFINITY; 256];
        for (code, seconds) in new_exchange_after {
            exchange[code as usize] = seconds;
        }
        let cfg = Config {
            max_sessions,
            max_pending,
            feed_limit,
            timeouts: timeouts.map(Timeouts),
            service: flags(service_ports, "service_ports")?,
            udp_service: flags(udp_services, "udp_services")?,
            handoff: flags(handoff_ports, "handoff_ports")?,
            handoff_remembered,
            new_exchange_after: exchange,
        };
        Ok(Table { inner: table::Table::new(cfg, Fragments::new(max_fragments, fragment_timeout)), resume: None, held: None })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    #[getter]
    fn max_sessions(&self) -> usize {
        self.inner.max_sessions()
    }

    /// Feed one TPACKET_V3 block, without the GIL. False: it stopped for the detectors (take
    /// the events, answer them, then call again with the same block).
    fn feed_block(&mut self, py: Python<'_>, block: &Bound<'_, PyAny>) -> PyResult<bool> {
        let buf = PyBuffer::<u8>::get(block)?;
        let data = bytes_of(&buf)?;
        let resume = self.resume.take();
        let inner = &mut self.inner;
        let out = py.detach(|| catch_unwind(AssertUnwindSafe(|| block::walk(data, inner, resume))));
        match out {
            Ok(Ok(())) => Ok(true),
            Ok(Err(r)) => {
                self.resume = Some(r);
                Ok(false)
            }
            Err(_) => Ok(self.bug()),
        }
    }

    /// Feed one frame (a capture file's record): as `feed_block`, False asks to call again with
    /// the same frame once the events were answered.
    #[pyo3(signature = (frame, link, wire_len, ts))]
    fn feed_frame(&mut self, frame: &Bound<'_, PyAny>, link: u32, wire_len: u64, ts: f64) -> PyResult<bool> {
        let buf = PyBuffer::<u8>::get(frame)?;
        let data = bytes_of(&buf)?;
        let (t, held) = (&mut self.inner, self.held.take());
        let out = catch_unwind(AssertUnwindSafe(|| {
            let mut d = Decoded::default();
            let ok = match held {
                Some(h) => {
                    d = h.0;
                    true
                }
                None => {
                    let out = t.fragments.decode(data, 0, data.len(), link, 0, wire_len, ts, &mut d);
                    t.count(out);
                    out.is_ok()
                }
            };
            (ok && !t.packet(&d, ts, data)).then_some(d)
        }));
        match out {
            Ok(Some(d)) => {
                self.held = Some((d, ts));
                Ok(false)
            }
            Ok(None) => Ok(true),
            Err(_) => Ok(self.bug()),
        }
    }

    /// The events since the previous call, in order: (handle, from_client, payload, fresh, tcp,
    /// client_port, server_port, app, ts) for a payload to inspect, (handle, dropped) for an end.
    fn take_events<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let t = &mut self.inner;
        let out = PyList::empty(py);
        for e in &t.events {
            match *e {
                Event::Feed { handle, fresh, tcp, client_port, server_port, from_client, app, ts, start, len } => {
                    let payload = PyBytes::new(py, &t.arena[start..start + len]);
                    out.append((handle, from_client, payload, fresh, tcp, client_port, server_port, app, ts))?;
                }
                Event::End { handle, dropped } => out.append((handle, dropped))?,
            }
        }
        t.next_batch();
        Ok(out)
    }

    /// The detectors are done with `handle`: `app` is their word, by the caller's code; `dirty`:
    /// the next report carries the session.
    #[pyo3(signature = (handle, app, dirty = false))]
    fn set_inspection(&mut self, handle: u64, app: u8, dirty: bool) {
        self.inner.set_inspection(handle, app, dirty);
    }

    /// Handles of the sessions seen last at or before `before` whose detection is still running,
    /// least recently seen first.
    fn idle_inspecting(&self, before: f64) -> Vec<u64> {
        self.inner.idle_inspecting(before)
    }

    fn expire(&mut self, now: f64) -> usize {
        self.inner.expire(now)
    }

    fn close_all(&mut self, reason: &str) -> PyResult<()> {
        let code = END_REASONS.iter().skip(1).position(|r| *r == reason)
            .ok_or_else(|| PyValueError::new_err(format!("unknown end reason {reason:?}")))?;
        self.inner.close_all(code as u8 + 1);
        Ok(())
    }

    /// (handle, first seen) of the changed sessions still being inspected.
    fn inspecting(&self) -> Vec<(u64, f64)> {
        self.inner.inspecting()
    }

    /// The sessions that changed since the previous call: (handle, (proto, vlan, client,
    /// client_port, server, server_port), (first, last), (new, opened, end_reason, state, app),
    /// (packets c2s, s2c, bytes c2s, s2c), (marks, echo changes)).
    fn collect<'py>(&mut self, py: Python<'py>, now: f64, hold: f64) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut err = None;
        self.inner.collect(now, hold, |i, s| {
            let (c, cp, sv, sp) = s.endpoints();
            let k = &s.key;
            let row = (
                s.handle(i),
                (k.proto, k.vlan, addr(py, &c, k.v6), cp, addr(py, &sv, k.v6), sp),
                (s.first, s.last),
                (s.new, s.opened, END_REASONS[s.end_reason as usize], s.state, s.app),
                s.deltas(),
                (s.marks, s.echo_changes),
            );
            if let Err(e) = out.append(row) {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(out), Err)
    }

    /// Cumulative counters: (frames, decoded, per-reason counts, created, evicted, expired,
    /// closed, unreported, fragment table counters, fragments remembered).
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let c = &self.inner.counters;
        let f = &self.inner.fragments.counters;
        (c.total, c.decoded, c.reasons, (c.created, c.evicted, c.expired, c.closed, c.unreported),
         (f.tracked, f.attributed, f.evicted_full, f.expired), self.inner.fragments.len())
            .into_pyobject(py)
    }
}

/// `decode.decode` of `frame[start:end]`: a reason's index (`MALFORMED + IGNORED`), or (vlan,
/// proto, src, dst, sport, dport, flags, ip_len, payload_start, payload_end, first_fragment).
#[pyfunction]
#[pyo3(signature = (frame, start, end, link, vlan = 0, wire_len = 0))]
fn decode_frame<'py>(py: Python<'py>, frame: &Bound<'py, PyAny>, start: usize, end: usize, link: u32, vlan: u16,
                     wire_len: u64) -> PyResult<Bound<'py, PyAny>> {
    let buf = PyBuffer::<u8>::get(frame)?;
    let data = bytes_of(&buf)?;
    let mut d = Decoded::default();
    Ok(match decode::decode(data, start, end, link, vlan, wire_len, &mut d) {
        Outcome::Packet => (
            (d.vlan, d.proto, addr(py, &d.src, d.v6), addr(py, &d.dst, d.v6), d.sport, d.dport, d.flags),
            (d.ip_len, d.payload_start, d.payload_end, d.frag.is_some()),
        ).into_pyobject(py)?.into_any(),
        Outcome::Later => (Reason::Fragment as u8).into_pyobject(py)?.into_any(),
        Outcome::Skip(r) => (r as u8).into_pyobject(py)?.into_any(),
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add("SOURCE_DIGEST", env!("FLOWMAP_SOURCE_DIGEST"))?;
    m.add_class::<Table>()?;
    m.add_function(wrap_pyfunction!(decode_frame, m)?)?;
    Ok(())
}
