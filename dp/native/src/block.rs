//! TPACKET_V3 blocks, as `flowmap_dp/block.py`'s `feed_block` (the reference): walk the
//! `tp_next_offset` chain of `struct tpacket3_hdr`, decode each frame, feed the session table.
//! Every header read is bounds-checked: a chain that leaves the block ends the walk, a frame is
//! clamped to the block, a garbage count cannot spin it (each step moves forward or stops).

use crate::decode::{Decoded, LINK_ETHERNET, LINK_RAW};
use crate::table::Table;

const TP_STATUS_VLAN_VALID: u32 = 0x10;
pub const BLOCK_DESC_SIZE: usize = 48;
const TPACKET3_HDR_SIZE: usize = 48;

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u16_le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Where a walk stopped for the detectors' answers: the frame at `off`, already decoded and
/// counted, and how many frames the block still promised.
pub struct Resume {
    off: usize,
    left: u64,
    decoded: Decoded,
    ts: f64,
}

/// Feed every frame of `block` to `table`; `Err` when the table asked to stop (see
/// `Table::packet`): call again with the same block and what it returned.
pub fn walk(block: &[u8], table: &mut Table, resume: Option<Resume>) -> Result<(), Resume> {
    let size = block.len();
    if size < BLOCK_DESC_SIZE {
        return Ok(());
    }
    let mut d = Decoded::default();
    let (mut off, mut left, mut held) = match resume {
        Some(r) => (r.off, r.left, Some((r.decoded, r.ts))),
        None => (u32_le(block, 16) as usize, u32_le(block, 12) as u64, None),
    };
    while left > 0 {
        if off + TPACKET3_HDR_SIZE > size {
            break;
        }
        let h = &block[off..off + TPACKET3_HDR_SIZE];
        let nxt = u32_le(h, 0) as usize;
        let (ok, ts) = match held.take() {
            Some(h) => {
                d = h.0;
                (true, h.1)
            }
            None => {
                let (sec, nsec, snap, wire, status) = (u32_le(h, 4), u32_le(h, 8), u32_le(h, 12), u32_le(h, 16), u32_le(h, 20));
                let (mac, net, tci) = (u16_le(h, 24), u16_le(h, 26), u32_le(h, 32));
                let start = off + mac as usize;
                let end = start.saturating_add(snap as usize).min(size);
                let ts = sec as f64 + nsec as f64 * 1e-9;
                let link = if net == mac { LINK_RAW } else { LINK_ETHERNET };
                let vlan = if status & TP_STATUS_VLAN_VALID != 0 { (tci & 0x0FFF) as u16 } else { 0 };
                let out = table.fragments.decode(block, start, end, link, vlan, wire as u64, ts, &mut d);
                table.count(out);
                (out.is_ok(), ts)
            }
        };
        if ok && !table.packet(&d, ts, block) {
            return Err(Resume { off, left, decoded: d, ts });
        }
        left -= 1;
        if nxt == 0 {
            break;
        }
        off += nxt;
    }
    Ok(())
}
