//! Framing of every `*.img` descriptor file: a fixed 32-byte header, then the prost-encoded
//! payload.
//!
//! ```text
//! offset size  field
//!      0    8  magic  "\x89CRIMG\r\n" (binary, catches text-mode mangling like PNG's)
//!      8    4  kind   (Kind code, little endian)
//!     12    4  format version
//!     16    8  payload length in bytes
//!     24    4  CRC32C of the payload
//!     28    4  CRC32C of bytes 0..28 (the header itself)
//! ```
//! Reading checks everything in an order that gives the most useful reason: a file too short
//! for a header, not a cr image at all, a damaged header, a newer format, the wrong kind of
//! image, a truncated or over-long payload, a damaged payload, then the protobuf decoding.
//! Page files (`pages-PID.img`) start with the same header inside a 4096-byte header page; see
//! `pages.rs`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use prost::Message;

/// First 8 bytes of every cr image file.
pub const MAGIC: [u8; 8] = *b"\x89CRIMG\r\n";
/// The format this cr writes and reads. Readers refuse a newer one rather than guess.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the frame header.
pub const HEADER_LEN: usize = 32;

/// What an image file holds. The code is stored in the header, so a file can be identified
/// (and shown) without knowing its name, and a file read as the wrong kind is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Kind {
    /// `inventory.img`: [`super::pb::Inventory`].
    Inventory = 1,
    /// `pstree.img`: [`super::pb::PsTree`].
    PsTree = 2,
    /// `core-TID.img`: [`super::pb::Core`].
    Core = 3,
    /// `mm-PID.img`: [`super::pb::Mm`].
    Mm = 4,
    /// `pagemap-PID.img`: [`super::pb::PageMap`].
    PageMap = 5,
    /// `pages-PID.img`: raw pages after a header page (not a framed message).
    Pages = 6,
    /// `fds-PID.img`: [`super::pb::Fds`].
    Fds = 7,
    /// `files.img`: [`super::pb::Files`].
    Files = 8,
    /// Raw bytes (e.g. the content of an unlinked file, named by `RegFile.content`).
    Blob = 9,
    /// Reserved for `tcp-INO.img` (message to be added to cr.proto by the net code).
    Tcp = 10,
    /// Reserved for `locks.img` (message to be added to cr.proto by the file-lock code).
    Locks = 11,
}

impl Kind {
    const ALL: [Kind; 11] = [
        Kind::Inventory,
        Kind::PsTree,
        Kind::Core,
        Kind::Mm,
        Kind::PageMap,
        Kind::Pages,
        Kind::Fds,
        Kind::Files,
        Kind::Blob,
        Kind::Tcp,
        Kind::Locks,
    ];

    /// The kind with this header code, if this cr knows it.
    pub fn from_code(code: u32) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u32 == code)
    }

    /// Human name, used in messages and by `cr show`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Inventory => "inventory",
            Kind::PsTree => "pstree",
            Kind::Core => "core",
            Kind::Mm => "mm",
            Kind::PageMap => "pagemap",
            Kind::Pages => "pages",
            Kind::Fds => "fds",
            Kind::Files => "files",
            Kind::Blob => "blob",
            Kind::Tcp => "tcp",
            Kind::Locks => "locks",
        }
    }
}

/// The decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub version: u32,
    pub payload_len: u64,
    pub payload_crc: u32,
}

impl Header {
    /// A header for `payload` of `kind`, at the current format version.
    pub fn for_payload(kind: Kind, payload: &[u8]) -> Header {
        Header {
            kind,
            version: FORMAT_VERSION,
            payload_len: payload.len() as u64,
            payload_crc: crc32c::crc32c(payload),
        }
    }

    /// The 32 header bytes, header CRC included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&(self.kind as u32).to_le_bytes());
        h[12..16].copy_from_slice(&self.version.to_le_bytes());
        h[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        h[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks the header at the start of `bytes` (`bytes` may be longer). The error
    /// is the bare reason; callers prefix the file name.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Header, String> {
        if bytes.len() < MAGIC.len() || bytes[0..8] != MAGIC {
            if bytes.len() < HEADER_LEN && MAGIC.starts_with(bytes) {
                return Err(format!(
                    "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                    bytes.len()
                ));
            }
            return Err("not a cr image file (bad magic)".to_string());
        }
        let Some(h) = bytes.get(0..HEADER_LEN) else {
            return Err(format!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ));
        };
        let le32 =
            |r: std::ops::Range<usize>| u32::from_le_bytes(h[r].try_into().unwrap_or([0; 4]));
        let stored_crc = le32(28..32);
        if crc32c::crc32c(&h[0..28]) != stored_crc {
            return Err("header checksum mismatch (file corrupted)".to_string());
        }
        let version = le32(12..16);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this cr reads version {FORMAT_VERSION}"
            ));
        }
        let code = le32(8..12);
        let kind = Kind::from_code(code)
            .ok_or_else(|| format!("unknown image kind {code} (written by a newer cr?)"))?;
        let payload_len = u64::from_le_bytes(h[16..24].try_into().unwrap_or([0; 8]));
        Ok(Header {
            kind,
            version,
            payload_len,
            payload_crc: le32(24..28),
        })
    }
}

/// Header + payload, ready to be written as one file.
pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&Header::for_payload(kind, payload).encode());
    out.extend_from_slice(payload);
    out
}

/// Checks a whole framed file held in memory and returns its header and payload. `expected`
/// (if given) is the kind the caller wants. The error is the bare reason.
pub fn unframe(
    bytes: &[u8],
    expected: Option<Kind>,
) -> std::result::Result<(Header, &[u8]), String> {
    let h = Header::decode(bytes)?;
    if let Some(want) = expected {
        if h.kind != want {
            return Err(format!(
                "holds a {} image, expected {}",
                h.kind.name(),
                want.name()
            ));
        }
    }
    if h.kind == Kind::Pages {
        return Err("is a page file, not a framed message".to_string());
    }
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have < h.payload_len {
        return Err(format!(
            "truncated: header says {} bytes, file has {have}",
            h.payload_len
        ));
    }
    if have > h.payload_len {
        return Err(format!(
            "{} unexpected bytes after the {}-byte payload (file corrupted)",
            have - h.payload_len,
            h.payload_len
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    if crc32c::crc32c(payload) != h.payload_crc {
        return Err("checksum mismatch (file corrupted)".to_string());
    }
    Ok((h, payload))
}

/// Decodes a prost message from a checked payload; `what` names the file in the error.
pub fn decode_msg<M: Message + Default>(payload: &[u8], kind: Kind, what: &Path) -> Result<M> {
    M::decode(payload).map_err(|e| {
        anyhow!(
            "{}: cannot decode the {} message: {e}",
            what.display(),
            kind.name()
        )
    })
}

/// Reads a whole framed file, checks it, and returns header and payload.
pub fn read_frame(path: &Path, expected: Option<Kind>) -> Result<(Header, Vec<u8>)> {
    let mut bytes = std::fs::read(path)
        .with_context(|| format!("cannot read image file {}", path.display()))?;
    let h = unframe(&bytes, expected)
        .map_err(|why| anyhow!("{}: {why}", path.display()))?
        .0;
    bytes.drain(..HEADER_LEN);
    Ok((h, bytes))
}

/// Reads `path`, checks its frame (magic, kind, version, length, both CRCs) and decodes it.
/// Errors name the file and the reason, e.g. "DIR/core-42.img: checksum mismatch (file corrupted)".
pub fn read_msg<M: Message + Default>(path: &Path, kind: Kind) -> Result<M> {
    let (_, payload) = read_frame(path, Some(kind))?;
    decode_msg(&payload, kind, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::pb;
    use crate::image::testutil::TempDir;

    fn sample_core() -> pb::Core {
        pb::Core {
            tid: 42,
            regs: Some(pb::GpRegs {
                rip: 0x401000,
                rsp: 0x7ffd_0000_1000,
                ..Default::default()
            }),
            xsave: vec![7u8; 1000],
            comm: "sleepy".into(),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_every_message_kind() {
        let t = TempDir::new("frame-rt");
        let p = t.path().join("core-42.img");
        std::fs::write(&p, frame(Kind::Core, &sample_core().encode_to_vec())).unwrap();
        let back: pb::Core = read_msg(&p, Kind::Core).unwrap();
        assert_eq!(back, sample_core());

        let inv = pb::Inventory {
            format_version: 1,
            root_pid: 7,
            parent_path: "../p".into(),
            ..Default::default()
        };
        let p = t.path().join("inventory.img");
        std::fs::write(&p, frame(Kind::Inventory, &inv.encode_to_vec())).unwrap();
        assert_eq!(read_msg::<pb::Inventory>(&p, Kind::Inventory).unwrap(), inv);

        // An empty message has an empty payload: still a valid frame.
        let p = t.path().join("fds-1.img");
        std::fs::write(&p, frame(Kind::Fds, &pb::Fds::default().encode_to_vec())).unwrap();
        assert_eq!(
            read_msg::<pb::Fds>(&p, Kind::Fds).unwrap(),
            pb::Fds::default()
        );

        for k in Kind::ALL {
            assert_eq!(Kind::from_code(k as u32), Some(k));
        }
    }

    fn err_of(p: &Path) -> String {
        format!("{:#}", read_msg::<pb::Core>(p, Kind::Core).unwrap_err())
    }

    #[test]
    fn corruption_is_detected_and_named() {
        let t = TempDir::new("frame-bad");
        let p = t.path().join("core-42.img");
        let good = frame(Kind::Core, &sample_core().encode_to_vec());

        let mut b = good.clone();
        b[HEADER_LEN + 10] ^= 0x40; // payload byte
        std::fs::write(&p, &b).unwrap();
        let e = err_of(&p);
        assert!(
            e.contains("core-42.img: checksum mismatch (file corrupted)"),
            "{e}"
        );

        let mut b = good.clone();
        b[17] ^= 1; // payload length in the header
        std::fs::write(&p, &b).unwrap();
        assert!(
            err_of(&p).contains("core-42.img: header checksum mismatch"),
            "{}",
            err_of(&p)
        );

        std::fs::write(&p, &good[..good.len() - 5]).unwrap();
        let e = err_of(&p);
        let want = format!(
            "truncated: header says {} bytes, file has {}",
            good.len() - HEADER_LEN,
            good.len() - HEADER_LEN - 5
        );
        assert!(e.contains(&want), "{e}");

        std::fs::write(&p, &good[..20]).unwrap();
        assert!(
            err_of(&p).contains("shorter than the 32-byte header"),
            "{}",
            err_of(&p)
        );

        let mut b = good.clone();
        b.push(0);
        std::fs::write(&p, &b).unwrap();
        assert!(
            err_of(&p).contains("unexpected bytes after"),
            "{}",
            err_of(&p)
        );

        std::fs::write(&p, b"{\"json\": true}, not an image at all").unwrap();
        assert!(
            err_of(&p).contains("not a cr image file (bad magic)"),
            "{}",
            err_of(&p)
        );

        std::fs::write(&p, frame(Kind::Mm, &[])).unwrap();
        assert!(
            err_of(&p).contains("holds a mm image, expected core"),
            "{}",
            err_of(&p)
        );

        let mut h = Header::for_payload(Kind::Core, &[]);
        h.version = 9;
        std::fs::write(&p, h.encode()).unwrap();
        assert!(
            err_of(&p).contains("format version 9, this cr reads version 1"),
            "{}",
            err_of(&p)
        );

        let missing = t.path().join("core-1.img");
        assert!(
            err_of(&missing).contains("core-1.img"),
            "{}",
            err_of(&missing)
        );
    }

    #[test]
    fn undecodable_payload_is_an_error_not_a_panic() {
        let t = TempDir::new("frame-dec");
        let p = t.path().join("core-3.img");
        std::fs::write(&p, frame(Kind::Core, &[0xff, 0xff, 0xff])).unwrap();
        assert!(
            err_of(&p).contains("cannot decode the core message"),
            "{}",
            err_of(&p)
        );
    }
}
