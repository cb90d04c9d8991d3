//! The wire between a dumping cr and a page server (`cr page-server`): TCP carrying
//! length-prefixed frames, each with the CRC32C of its payload and of its own header (as image
//! files have them, `file.rs`), so a damaged or cut stream is an error, never a wrong image.
//!
//! ```text
//! offset size  field
//!      0    4  magic "CRW\x01"
//!      4    2  type (Type code, little endian)
//!      6    2  flags (0)
//!      8    4  payload length (at most MAX_PAYLOAD)
//!     12    4  id: the file a frame is about (0 when unused)
//!     16    8  arg: a file offset or size (0 when unused)
//!     24    4  CRC32C of the payload
//!     28    4  CRC32C of bytes 0..28
//! ```
//! A session: the client says `Hello` (the protocol versions it speaks and what it sends),
//! the server answers `Hello` with the version chosen (or `Error`). Then files: `Open` (id, a
//! plain `*.img` name), `Write` (id, offset, bytes), `Close` (id, final size: the server
//! fsyncs and renames it into place); `Sync` is answered with `Synced` once everything before
//! it is durable on the server, or with `Error`. `Done` ends a session that delivered what it
//! announced. A server that fails sends `Error` (its reason) and closes.
//!
//! The files are those of an image directory, written by the server as `ImageWriter` writes
//! them locally (temporary name, fsync, rename; `inventory.img` last): [`receive`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::names::INVENTORY;
use super::writer::{check_name, create_temp, fsync_dir};

/// First 4 bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CRW\x01";
/// Size of a frame header.
pub const HEADER_LEN: usize = 32;
/// Largest payload of one frame: writes are cut into frames of at most this.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// The protocol versions this cr speaks (oldest, newest).
pub const VERSIONS: (u32, u32) = (1, 1);
/// How long a peer may take to take our bytes or to answer a `Sync` (its fsyncs included)
/// before the connection counts as lost.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Type {
    Hello = 1,
    Open = 2,
    Write = 3,
    Close = 4,
    Sync = 5,
    Synced = 6,
    Error = 7,
    Done = 8,
    /// Migration: the files that follow belong to the image NAME (the payload), a directory
    /// of the server's.
    Image = 9,
    /// Migration: restore the image NAME (the payload); answered with `Running` (id: the
    /// restored root's PID) or `Error`.
    Restore = 10,
    Running = 11,
}

impl Type {
    fn from_code(c: u16) -> Option<Type> {
        use Type::*;
        [
            Hello, Open, Write, Close, Sync, Synced, Error, Done, Image, Restore, Running,
        ]
        .into_iter()
        .find(|t| *t as u16 == c)
    }
}

/// What the client announces in its `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Page files and page maps only; the rest of the image stays with the client (CRIU's
    /// `--page-server`).
    Pages,
    /// A whole image, `inventory.img` last: the server's directory is restorable as it is.
    Image,
    /// Whole images one after another, each in a directory of its own (`Image`), then
    /// `Restore` of the last (`cr migrate`).
    Migration,
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub ty: Type,
    pub len: u32,
    pub id: u32,
    pub arg: u64,
    pub crc: u32,
}

impl Frame {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&(self.ty as u16).to_le_bytes());
        h[8..12].copy_from_slice(&self.len.to_le_bytes());
        h[12..16].copy_from_slice(&self.id.to_le_bytes());
        h[16..24].copy_from_slice(&self.arg.to_le_bytes());
        h[24..28].copy_from_slice(&self.crc.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header; the error is the bare reason.
    fn decode(h: &[u8; HEADER_LEN]) -> std::result::Result<Frame, String> {
        if h[0..4] != MAGIC {
            return Err("not a cr wire frame (bad magic): is the peer a cr page server?".into());
        }
        let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        if crc32c::crc32c(&h[0..28]) != le32(28) {
            return Err("frame header checksum mismatch (stream corrupted)".into());
        }
        let code = u16::from_le_bytes([h[4], h[5]]);
        let ty = Type::from_code(code).ok_or_else(|| format!("unknown frame type {code}"))?;
        let len = le32(8);
        if len as usize > MAX_PAYLOAD {
            return Err(format!(
                "frame of {len} bytes, more than the {MAX_PAYLOAD} allowed"
            ));
        }
        let mut arg = [0u8; 8];
        arg.copy_from_slice(&h[16..24]);
        Ok(Frame {
            ty,
            len,
            id: le32(12),
            arg: u64::from_le_bytes(arg),
            crc: le32(24),
        })
    }
}

/// Writes one frame whose payload is `parts` back to back.
pub fn write_frame(
    w: &mut impl Write,
    ty: Type,
    id: u32,
    arg: u64,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    debug_assert!(len <= MAX_PAYLOAD);
    let crc = parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p));
    let head = Frame {
        ty,
        len: len as u32,
        id,
        arg,
        crc,
    }
    .encode();
    let mut slices: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    slices.push(&head);
    slices.extend(parts.iter().filter(|p| !p.is_empty()));
    write_all_vectored(w, &mut slices)
}

/// `write_vectored` until every byte of `slices` is written.
fn write_all_vectored(w: &mut impl Write, slices: &mut [&[u8]]) -> std::io::Result<()> {
    let mut first = 0;
    while first < slices.len() {
        let io: Vec<IoSlice> = slices[first..].iter().map(|s| IoSlice::new(s)).collect();
        let mut n = match w.write_vectored(&io) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while first < slices.len() && n >= slices[first].len() {
            n -= slices[first].len();
            first += 1;
        }
        if n > 0 {
            slices[first] = &slices[first][n..];
        }
    }
    Ok(())
}

/// Reads one frame into `buf` (its payload, checked against the frame's CRC). `Ok(None)`: the
/// peer closed the connection cleanly between frames.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<Frame>> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => bail!("connection closed inside a frame header"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading a frame"),
        }
    }
    let f = Frame::decode(&h).map_err(|why| anyhow!(why))?;
    buf.resize(f.len as usize, 0);
    r.read_exact(buf).with_context(|| {
        format!(
            "connection lost inside a {:?} frame of {} bytes",
            f.ty, f.len
        )
    })?;
    if crc32c::crc32c(buf) != f.crc {
        bail!(
            "{:?} frame payload checksum mismatch (stream corrupted)",
            f.ty
        );
    }
    Ok(Some(f))
}

fn hello_payload(content: Content) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&VERSIONS.0.to_le_bytes());
    p[4..8].copy_from_slice(&VERSIONS.1.to_le_bytes());
    let c: u32 = match content {
        Content::Pages => 0,
        Content::Image => 1,
        Content::Migration => 2,
    };
    p[8..12].copy_from_slice(&c.to_le_bytes());
    p
}

/// The client's `Hello`: (oldest, newest) versions, content.
fn parse_hello(p: &[u8]) -> Result<(u32, u32, Content)> {
    if p.len() < 12 {
        bail!("short Hello ({} bytes)", p.len());
    }
    let le32 = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    let content = match le32(8) {
        0 => Content::Pages,
        1 => Content::Image,
        2 => Content::Migration,
        c => bail!("the client announces content {c}, unknown to this cr"),
    };
    Ok((le32(0), le32(4), content))
}

/// The highest version both sides speak.
fn negotiate(theirs: (u32, u32)) -> Option<u32> {
    let v = theirs.1.min(VERSIONS.1);
    (v >= theirs.0.max(VERSIONS.0)).then_some(v)
}

struct Conn {
    stream: TcpStream,
    /// Set once the connection failed: every later call says why.
    broken: Option<String>,
    next_id: u32,
}

/// The client end: sends the files of an image to a page server. Shared by the dump's threads
/// (every call takes `&self`; frames of concurrent writers never interleave).
pub struct Sender {
    peer: String,
    content: Content,
    version: u32,
    conn: Mutex<Conn>,
}

impl Sender {
    /// Connects to `host:port` and negotiates the version.
    pub fn connect(host: &str, port: u16, content: Content) -> Result<Sender> {
        let peer = format!("{host}:{port}");
        let addrs: Vec<_> = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve page server address {peer}"))?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(10)) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(stream) = stream else {
            let why = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
            crate::bad_input!("cannot connect to the page server at {peer}: {why}");
        };
        stream
            .set_nodelay(true)
            .and_then(|_| stream.set_write_timeout(Some(TIMEOUT)))
            .and_then(|_| stream.set_read_timeout(Some(TIMEOUT)))
            .with_context(|| format!("socket options of the connection to {peer}"))?;
        let mut s = &stream;
        write_frame(&mut s, Type::Hello, 0, 0, &[&hello_payload(content)])
            .with_context(|| format!("cannot greet the page server at {peer}"))?;
        let mut buf = Vec::new();
        let f = read_frame(&mut s, &mut buf)
            .with_context(|| format!("no answer from the page server at {peer}"))?
            .ok_or_else(|| anyhow!("the page server at {peer} closed the connection"))?;
        let version = match f.ty {
            Type::Hello if negotiate((f.id, f.id)).is_some() => f.id,
            Type::Hello => bail!(
                "the page server at {peer} chose protocol version {}; this cr speaks {}..={}",
                f.id,
                VERSIONS.0,
                VERSIONS.1
            ),
            Type::Error => bail!(
                "the page server at {peer} refused: {}",
                String::from_utf8_lossy(&buf)
            ),
            t => bail!("the page server at {peer} answered {t:?} to Hello"),
        };
        log::info!("connected to the page server at {peer} (protocol version {version})");
        Ok(Sender {
            peer,
            content,
            version,
            conn: Mutex::new(Conn {
                stream,
                broken: None,
                next_id: 1,
            }),
        })
    }

    /// The page server's address as given.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// What this session sends.
    pub fn content(&self) -> Content {
        self.content
    }

    /// The protocol version in use.
    pub fn version(&self) -> u32 {
        self.version
    }

    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| anyhow!("page server connection poisoned"))?;
        if let Some(why) = &c.broken {
            bail!("{why}");
        }
        match f(&mut c) {
            Ok(v) => Ok(v),
            Err(e) => {
                let why = format!("{:#}", self.explain(&mut c.stream, e));
                c.broken = Some(why.clone());
                Err(anyhow!(why))
            }
        }
    }

    /// A failed send: the server's own reason if it sent one before closing.
    fn explain(&self, s: &mut TcpStream, e: anyhow::Error) -> anyhow::Error {
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = Vec::new();
        let mut r: &TcpStream = s;
        // Frames the server sent before its error are answers we did not wait for.
        for _ in 0..64 {
            match read_frame(&mut r, &mut buf) {
                Ok(Some(f)) if f.ty == Type::Error => {
                    return anyhow!(
                        "the page server at {} failed: {}",
                        self.peer,
                        String::from_utf8_lossy(&buf)
                    )
                }
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
        e.context(format!(
            "connection to the page server at {} lost",
            self.peer
        ))
    }

    /// Starts file `name` on the server; returns its id for [`Sender::write`].
    pub fn open(&self, name: &str) -> Result<u32> {
        self.with(|c| {
            let id = c.next_id;
            c.next_id += 1;
            write_frame(&mut c.stream, Type::Open, id, 0, &[name.as_bytes()])
                .with_context(|| format!("sending {name}"))?;
            Ok(id)
        })
    }

    /// Writes `data` (back to back) at `offset` of file `id`, in frames of at most
    /// [`MAX_PAYLOAD`] bytes.
    pub fn write(&self, id: u32, mut offset: u64, data: &[&[u8]]) -> Result<()> {
        self.with(|c| {
            let mut parts: Vec<&[u8]> = Vec::new();
            let mut len = 0usize;
            let mut flush = |parts: &mut Vec<&[u8]>, len: &mut usize, offset: &mut u64| {
                if *len == 0 {
                    return Ok(());
                }
                write_frame(&mut c.stream, Type::Write, id, *offset, parts)?;
                *offset += *len as u64;
                parts.clear();
                *len = 0;
                Ok::<(), std::io::Error>(())
            };
            for d in data {
                let mut rest = *d;
                while !rest.is_empty() {
                    let n = (MAX_PAYLOAD - len).min(rest.len());
                    parts.push(&rest[..n]);
                    len += n;
                    rest = &rest[n..];
                    if len == MAX_PAYLOAD {
                        flush(&mut parts, &mut len, &mut offset).context("sending pages")?;
                    }
                }
            }
            flush(&mut parts, &mut len, &mut offset).context("sending pages")
        })
    }

    /// Ends file `id`, `size` bytes long: the server makes it durable and renames it into
    /// place.
    pub fn close(&self, id: u32, size: u64) -> Result<()> {
        self.with(|c| {
            write_frame(&mut c.stream, Type::Close, id, size, &[]).context("closing a file")?;
            Ok(())
        })
    }

    /// Sends a whole file.
    pub fn send_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let id = self.open(name)?;
        self.write(id, 0, &[bytes])?;
        self.close(id, bytes.len() as u64)
    }

    /// Waits until everything sent so far is durable on the server.
    pub fn sync(&self) -> Result<()> {
        self.with(|c| {
            write_frame(&mut c.stream, Type::Sync, 0, 0, &[]).context("sending Sync")?;
            let mut buf = Vec::new();
            let mut r: &TcpStream = &c.stream;
            match read_frame(&mut r, &mut buf)? {
                Some(f) if f.ty == Type::Synced => Ok(()),
                Some(f) if f.ty == Type::Error => Err(anyhow!(
                    "the page server at {} failed: {}",
                    self.peer,
                    String::from_utf8_lossy(&buf)
                )),
                Some(f) => bail!("the page server answered {:?} to Sync", f.ty),
                None => bail!("the page server closed the connection"),
            }
        })
    }

    /// Migration: the files sent from now on make up image `name` on the server.
    pub fn begin_image(&self, name: &str) -> Result<()> {
        self.with(|c| {
            write_frame(&mut c.stream, Type::Image, 0, 0, &[name.as_bytes()])
                .with_context(|| format!("starting image {name}"))?;
            Ok(())
        })
    }

    /// Migration: asks the server to restore image `name`; returns the restored root's PID
    /// once it runs there.
    pub fn restore(&self, name: &str) -> Result<i32> {
        self.with(|c| {
            write_frame(&mut c.stream, Type::Restore, 0, 0, &[name.as_bytes()])
                .context("sending Restore")?;
            let mut buf = Vec::new();
            let mut r: &TcpStream = &c.stream;
            match read_frame(&mut r, &mut buf)? {
                Some(f) if f.ty == Type::Running => Ok(f.id as i32),
                Some(f) if f.ty == Type::Error => Err(anyhow!(
                    "{} failed: {}",
                    self.peer,
                    String::from_utf8_lossy(&buf)
                )),
                Some(f) => bail!("{} answered {:?} to Restore", self.peer, f.ty),
                None => bail!("{} closed the connection", self.peer),
            }
        })
    }

    /// Ends the session: everything announced was sent (and synced).
    pub fn done(&self) -> Result<()> {
        self.with(|c| {
            write_frame(&mut c.stream, Type::Done, 0, 0, &[]).context("sending Done")?;
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            Ok(())
        })
    }
}

/// What a page server received.
#[derive(Debug, Default)]
pub struct Received {
    /// Files renamed into place, in the order they were closed.
    pub files: Vec<PathBuf>,
    pub bytes: u64,
    /// The client sent a whole image (`inventory.img` included): the last one, in a migration.
    pub complete_image: bool,
    /// Images begun (migration).
    pub images: usize,
}

/// A file being received.
struct Incoming {
    name: String,
    file: File,
    tmp: PathBuf,
    /// The image directory it goes to.
    dir: PathBuf,
}

/// Receives one session from `stream` into `dir` (an images directory made with
/// `prepare_images_dir`): each file is written under a temporary name, fsynced and renamed
/// when closed; `inventory.img`, if sent, must come last. On failure the client is told why
/// (an `Error` frame), and every file of the session is removed again, so a failed transfer
/// leaves nothing that looks received.
pub fn receive(stream: &TcpStream, dir: &Path) -> Result<Received> {
    session(stream, dir, None)
}

/// Restores a received image (the migration destination's side); returns the restored root's
/// PID.
pub type RestoreFn<'a> = dyn FnMut(&Path) -> Result<i32> + 'a;

/// Receives a migration from `stream`: images into directories of `root` (each prepared as
/// `prepare_images_dir` does, made as [`receive`] makes one), and `restore` called for the
/// image the client names in its `Restore`. Returns after `Done`. On failure before the
/// restore, every file of the session is removed again.
pub fn receive_migration(
    stream: &TcpStream,
    root: &Path,
    restore: &mut RestoreFn,
) -> Result<Received> {
    session(stream, root, Some(restore))
}

fn session(stream: &TcpStream, dir: &Path, restore: Option<&mut RestoreFn>) -> Result<Received> {
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut open: HashMap<u32, Incoming> = HashMap::new();
    let mut got = Received::default();
    let mut restored = false;
    let r = receive_frames(stream, dir, &mut open, &mut got, restore, &mut restored);
    if let Err(e) = &r {
        let mut s = stream;
        let _ = write_frame(&mut s, Type::Error, 0, 0, &[format!("{e:#}").as_bytes()]);
        for (_, f) in open.drain() {
            let _ = std::fs::remove_file(&f.tmp);
        }
        if !restored {
            for p in &got.files {
                let _ = std::fs::remove_file(p);
            }
        }
        let _ = fsync_dir(dir);
    }
    r.map(|_| got)
}

fn receive_frames(
    stream: &TcpStream,
    root: &Path,
    open: &mut HashMap<u32, Incoming>,
    got: &mut Received,
    mut restore: Option<&mut RestoreFn>,
    restored: &mut bool,
) -> Result<()> {
    // The image being received (a migration names each one first).
    let mut dir: Option<PathBuf> = restore.is_none().then(|| root.to_path_buf());
    let mut names: Vec<String> = Vec::new();
    let mut r = std::io::BufReader::with_capacity(1 << 20, stream);
    let mut w = stream;
    let mut buf = Vec::new();
    let progress =
        crate::progress::Progress::start(format!("receiving into {}", root.display()), 0);
    let f = read_frame(&mut r, &mut buf)?.context("the client closed before saying Hello")?;
    if f.ty != Type::Hello {
        bail!("the client began with {:?}, not Hello", f.ty);
    }
    let (oldest, newest, content) = parse_hello(&buf)?;
    if (content == Content::Migration) != restore.is_some() {
        bail!(
            "the client sends {}, this server receives {}",
            if content == Content::Migration {
                "a migration (cr migrate)"
            } else {
                "a dump (cr dump --page-server)"
            },
            if restore.is_some() {
                "a migration (cr migrate --to)"
            } else {
                "a dump (cr dump --page-server)"
            }
        );
    }
    let Some(version) = negotiate((oldest, newest)) else {
        bail!(
            "the client speaks protocol versions {oldest}..={newest}, this cr {}..={}",
            VERSIONS.0,
            VERSIONS.1
        );
    };
    write_frame(&mut w, Type::Hello, version, 0, &[]).context("answering Hello")?;
    log::info!(
        "receiving {} into {} (protocol version {version})",
        match content {
            Content::Pages => "pages",
            Content::Image => "an image",
            Content::Migration => "a migration",
        },
        root.display()
    );
    loop {
        let Some(f) = read_frame(&mut r, &mut buf)? else {
            bail!("the client closed the connection before the transfer was complete (its dump failed or was killed?)");
        };
        match f.ty {
            Type::Image => {
                let name = String::from_utf8(buf.clone())
                    .map_err(|_| anyhow!("an image name that is not UTF-8"))?;
                if name.is_empty() || name.contains('/') || name.starts_with('.') {
                    bail!("bad image name {name:?}: must be a plain directory name");
                }
                if content != Content::Migration {
                    bail!("an Image frame outside a migration");
                }
                if let Some(o) = open.values().next() {
                    bail!("image {name} begun while {} is still open", o.name);
                }
                if dir.is_some() && !got.complete_image {
                    bail!("image {name} begun before the last one was complete");
                }
                let d = root.join(&name);
                super::writer::prepare_images_dir(&d, false)?;
                log::info!("receiving image {name}");
                dir = Some(d);
                names.clear();
                got.complete_image = false;
                got.images += 1;
            }
            Type::Restore => {
                let name = String::from_utf8_lossy(&buf).into_owned();
                let Some(restore) = restore.as_mut() else {
                    bail!("a Restore frame outside a migration");
                };
                let d = root.join(&name);
                if dir.as_deref() != Some(d.as_path()) || !got.complete_image {
                    bail!("Restore of {name}, which is not the complete image last received");
                }
                *restored = true;
                let pid = restore(&d).with_context(|| format!("restoring {}", d.display()))?;
                write_frame(&mut w, Type::Running, pid as u32, 0, &[])
                    .context("answering Restore")?;
            }
            Type::Open => {
                let name = String::from_utf8(buf.clone())
                    .map_err(|_| anyhow!("a file name that is not UTF-8"))?;
                check_name(&name)?;
                let Some(dir) = dir.as_deref() else {
                    bail!("{name} sent before any Image frame");
                };
                if got.complete_image {
                    bail!("{name} sent after {INVENTORY}");
                }
                if names.contains(&name) || open.values().any(|o| o.name == name) {
                    bail!("{name} sent twice");
                }
                if name == INVENTORY && !open.is_empty() {
                    bail!("{INVENTORY} opened while other files are still open");
                }
                if name == INVENTORY && content == Content::Pages {
                    bail!("{INVENTORY} sent in a pages-only session");
                }
                if open.contains_key(&f.id) {
                    bail!("file id {} opened twice", f.id);
                }
                let (file, tmp) = create_temp(dir, &name)?;
                open.insert(
                    f.id,
                    Incoming {
                        name,
                        file,
                        tmp,
                        dir: dir.to_path_buf(),
                    },
                );
            }
            Type::Write => {
                let inc = open
                    .get(&f.id)
                    .ok_or_else(|| anyhow!("a write to file id {}, which is not open", f.id))?;
                inc.file
                    .write_all_at(&buf, f.arg)
                    .with_context(|| format!("cannot write {}", inc.tmp.display()))?;
                got.bytes += buf.len() as u64;
                progress.add(buf.len() as u64);
            }
            Type::Close => {
                let inc = open
                    .remove(&f.id)
                    .ok_or_else(|| anyhow!("a close of file id {}, which is not open", f.id))?;
                let done = inc
                    .file
                    .set_len(f.arg)
                    .and_then(|_| inc.file.sync_all())
                    .with_context(|| format!("cannot write {}", inc.tmp.display()))
                    .and_then(|_| {
                        if inc.name == INVENTORY {
                            // Everything else durable before the inventory can exist.
                            fsync_dir(&inc.dir)?;
                        }
                        std::fs::rename(&inc.tmp, inc.dir.join(&inc.name)).with_context(|| {
                            format!("cannot rename {} to {}", inc.tmp.display(), inc.name)
                        })
                    });
                if let Err(e) = done {
                    let _ = std::fs::remove_file(&inc.tmp);
                    return Err(e);
                }
                log::debug!("received {} ({} bytes)", inc.name, f.arg);
                if inc.name == INVENTORY {
                    fsync_dir(&inc.dir)?;
                    got.complete_image = true;
                }
                got.files.push(inc.dir.join(&inc.name));
                names.push(inc.name);
            }
            Type::Sync => {
                if let Some(d) = &dir {
                    fsync_dir(d)?;
                }
                write_frame(&mut w, Type::Synced, 0, 0, &[]).context("answering Sync")?;
            }
            Type::Done => {
                if let Some(o) = open.values().next() {
                    bail!("Done while {} is still open", o.name);
                }
                if content == Content::Image && !got.complete_image {
                    bail!("Done before {INVENTORY} was sent");
                }
                if content == Content::Migration && !*restored {
                    bail!("Done before any Restore");
                }
                if let Some(d) = &dir {
                    fsync_dir(d)?;
                }
                return Ok(());
            }
            t => bail!("unexpected {t:?} frame from the client"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_caught() {
        let mut out = Vec::new();
        write_frame(&mut out, Type::Write, 7, 4096, &[b"abc", b"", b"defg"]).unwrap();
        let mut buf = Vec::new();
        let f = read_frame(&mut &out[..], &mut buf).unwrap().unwrap();
        assert_eq!((f.ty, f.id, f.arg, f.len), (Type::Write, 7, 4096, 7));
        assert_eq!(buf, b"abcdefg");
        // A flipped payload byte, a flipped header byte, a cut: each an error.
        let mut bad = out.clone();
        bad[HEADER_LEN + 1] ^= 1;
        let e = read_frame(&mut &bad[..], &mut buf).unwrap_err();
        assert!(format!("{e}").contains("payload checksum"), "{e}");
        let mut bad = out.clone();
        bad[13] ^= 1;
        let e = read_frame(&mut &bad[..], &mut buf).unwrap_err();
        assert!(format!("{e}").contains("header checksum"), "{e}");
        let e = read_frame(&mut &out[..out.len() - 1], &mut buf).unwrap_err();
        assert!(format!("{e:#}").contains("connection lost"), "{e:#}");
        assert!(read_frame(&mut &out[..0], &mut buf).unwrap().is_none());
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate((1, 1)), Some(1));
        assert_eq!(negotiate((1, 9)), Some(VERSIONS.1));
        assert_eq!(negotiate((VERSIONS.1 + 1, VERSIONS.1 + 3)), None);
    }

    #[test]
    fn a_session_lands_files_and_a_cut_one_leaves_nothing() {
        let d = crate::image::testutil::TempDir::new("wire");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let dir = d.path().to_path_buf();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let first = receive(&s, &dir);
            let (s, _) = l.accept().unwrap();
            (first, receive(&s, &dir))
        });
        let s = Sender::connect("127.0.0.1", port, Content::Pages).unwrap();
        s.send_file("pagemap-1.img", b"map").unwrap();
        let id = s.open("pages-1.img").unwrap();
        s.write(id, 4096, &[&[1u8; 8192]]).unwrap();
        s.write(id, 0, &[b"head"]).unwrap();
        s.close(id, 4096 + 8192).unwrap();
        s.sync().unwrap();
        s.done().unwrap();
        // The second session dies after a file and a half.
        let s2 = Sender::connect("127.0.0.1", port, Content::Pages).unwrap();
        s2.send_file("pagemap-2.img", b"map2").unwrap();
        let id = s2.open("pages-2.img").unwrap();
        s2.write(id, 0, &[b"x"]).unwrap();
        drop(s2);
        let (first, second) = server.join().unwrap();
        let got = first.unwrap();
        let dirp = d.path();
        assert_eq!(
            got.files,
            [dirp.join("pagemap-1.img"), dirp.join("pages-1.img")]
        );
        assert_eq!(
            std::fs::read(d.path().join("pagemap-1.img")).unwrap(),
            b"map"
        );
        let pages = std::fs::read(d.path().join("pages-1.img")).unwrap();
        assert_eq!(pages.len(), 4096 + 8192);
        assert_eq!(&pages[..4], b"head");
        assert!(pages[4096..].iter().all(|b| *b == 1));
        assert!(second.is_err());
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut left = left;
        left.sort();
        assert_eq!(left, ["pagemap-1.img", "pages-1.img"]);
    }
}
