//! flowmap's compiled per-packet path: the TPACKET_V3 block walk (`block`), the decoder and the
//! fragment table (`decode`), the session table (`table`). The Python face is `python`; the
//! reference it is held to is the Python of `flowmap_dp.block`, `decode` and `session`.

pub mod block;
pub mod decode;
pub mod table;

#[cfg(feature = "python")]
mod python;
