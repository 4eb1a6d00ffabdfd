//! The journal writer: recovery at open, a writer thread that owns the files,
//! acknowledgement by fdatasync, segment rolling and the disk quota.
//!
//! Principal types: [`Journal`], [`JournalConfig`], [`Recovery`],
//! [`Acknowledgements`].
//!
//! Invariants:
//! - One writer per directory at a time (an advisory `flock` on `LOCK`, as
//!   LevelDB does).
//! - [`Journal::append`] encodes into a fixed-capacity buffer and hands it to
//!   the writer thread through a bounded channel: it neither allocates nor
//!   touches the disk (it waits only when the queue of
//!   [`QUEUE_DEPTH`] records is full).
//! - An LSN is acknowledged (returned by [`Journal::durable_lsn`], and
//!   [`Journal::wait_durable`] returns) only after `fdatasync` on its segment
//!   returned success. A failed write or fsync stops the writer for good and
//!   every later call reports it; nothing is retried (PostgreSQL's
//!   "fsyncgate", 2018: after a failed fsync the kernel may have dropped the
//!   dirty pages, so a retry that succeeds proves nothing).
//! - Segments are created complete: header written to a temporary file,
//!   fsynced, renamed, directory fsynced.
//! - Recovery truncates only the incomplete tail of the newest segment (what
//!   an interrupted append leaves). A newest segment damaged up to its end is
//!   left untouched and a new segment started, with LSNs that skip every
//!   number the damaged bytes could have held, so no LSN is ever reused.
//! - Only sealed segments the host acknowledged are ever deleted, and only
//!   when the quota needs the space; when it cannot be found the record is
//!   refused with [`JournalError::QuotaFull`].

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::reader::{list_segments, read_segment};
use super::record::{encode, lsn_of, Body, RECORD_MAX, RECORD_PREFIX};
use crate::ids::DeviceId;
use super::segment::{max_framed_len, segment_file_name, Damage, Framer, SegmentHeader, Tail, CHUNK_HEADER, HEADER_LEN};
use super::JournalError;
use crate::durable_file::{sync_dir, write_atomic};
use crate::file_error::FileError;
use crate::profile::{Durability, Profile};

/// Records that can wait for the writer thread before `append` blocks.
pub const QUEUE_DEPTH: usize = 8;

/// Most queued records the group-commit writer frames into one write.
const DRAIN_MAX: usize = 2 * QUEUE_DEPTH;

/// File in the journal directory naming the newest segment the host holds.
pub const HOST_ACK_FILE: &str = "host-ack";

/// Fewest bytes a record takes on disk: a chunk header and the record prefix.
const MIN_RECORD_BYTES: u64 = (CHUNK_HEADER + RECORD_PREFIX) as u64;

/// File locked by the writer.
pub const LOCK_FILE: &str = "LOCK";

/// How a journal writes; [`JournalConfig::for_profile`] gives the profile's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    /// When a record counts as stored.
    pub durability: Durability,
    /// Interval between syncs in group-commit mode.
    pub group_commit: Duration,
    /// A segment is sealed and a new one started before it would exceed this, bytes.
    pub segment_bytes: u64,
    /// Most bytes of segment files the journal keeps.
    pub disk_quota_bytes: u64,
}

impl JournalConfig {
    /// The journal settings of `profile`.
    pub fn for_profile(profile: &Profile) -> JournalConfig {
        let j = &profile.journal;
        JournalConfig {
            durability: j.durability,
            group_commit: Duration::from_millis(j.group_commit_ms.into()),
            segment_bytes: j.segment_bytes,
            disk_quota_bytes: j.disk_quota_bytes,
        }
    }
}

/// What [`Journal::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// Segment files found.
    pub segments: usize,
    /// The segment appended to.
    pub active_seq: u64,
    /// LSN the next record gets.
    pub next_lsn: u64,
    /// The torn tail cut from the newest segment: (segment, tail).
    pub truncated: Option<(u64, Tail)>,
    /// Damaged regions found in the newest segment of this device, as
    /// (segment, damage): skipped by readers, kept on disk.
    pub damage: Vec<(u64, Damage)>,
    /// Segments not appended to because they are another device's or unreadable: (file, why).
    pub skipped: Vec<(PathBuf, String)>,
}

impl Recovery {
    /// What recovery repaired or skipped, one sentence each, for an operator
    /// (empty when the journal was clean).
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some((seq, tail)) = &self.truncated {
            notes.push(format!(
                "cut an incomplete record ({} bytes at offset {}) from the end of segment {seq}",
                tail.range.end - tail.range.start,
                tail.range.start
            ));
        }
        for (seq, d) in &self.damage {
            notes.push(format!("segment {seq}: bytes {}..{} are damaged ({}) and skipped", d.range.start, d.range.end, d.reason));
        }
        if self.damage.iter().any(|(seq, _)| *seq != self.active_seq) {
            notes.push(format!("the damaged segment is kept as it is; new records go to segment {}", self.active_seq));
        }
        for (path, why) in &self.skipped {
            notes.push(format!("{} is not appended to: {why}", path.display()));
        }
        notes
    }
}

/// The journal of one device, open for appending.
pub struct Journal {
    sender: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    next_lsn: u64,
    quota: u64,
    recovery: Recovery,
    _lock: File,
}

type Slot = heapless::Vec<u8, RECORD_MAX>;

// A record travels inline in its message, so appending never allocates.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Record(Slot),
    Acknowledge(u64, Sender<Result<(), String>>),
    Seal(Sender<Result<u64, String>>),
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Bytes of segment files on disk.
    used: AtomicU64,
    /// Of those, bytes of sealed segments the host acknowledged.
    reclaimable: AtomicU64,
    /// Upper bound of the bytes of records queued but not yet written.
    queued: AtomicU64,
}

#[derive(Default)]
struct State {
    durable: u64,
    failure: Option<String>,
}

impl Shared {
    fn publish(&self, lsn: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.durable = state.durable.max(lsn);
        self.changed.notify_all();
    }

    fn fail(&self, message: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failure.get_or_insert(message);
        self.changed.notify_all();
    }

    fn failure(&self) -> Option<JournalError> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failure.clone().map(JournalError::WriterFailed)
    }
}

/// Most disk bytes a `len`-byte record can add: its framing, and the header
/// of a new segment if it starts one.
fn queued_bound(len: usize) -> u64 {
    (max_framed_len(len) + HEADER_LEN) as u64
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(JournalError::io(&path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(JournalError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

/// Reads the host acknowledgement: the newest segment the host holds (0: none).
///
/// # Errors
/// The file exists but cannot be read or does not hold `acknowledged_through_segment N`.
pub fn read_host_ack(dir: &Path) -> Result<u64, JournalError> {
    let path = dir.join(HOST_ACK_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(JournalError::io(&path)(e)),
    };
    text.trim()
        .strip_prefix("acknowledged_through_segment ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| FileError::invalid(&path, "expected `acknowledged_through_segment N`").into())
}

fn read_header(path: &Path) -> Option<SegmentHeader> {
    use std::io::Read;
    let mut bytes = [0u8; HEADER_LEN];
    File::open(path).and_then(|mut f| f.read_exact(&mut bytes)).ok()?;
    SegmentHeader::decode(&bytes).ok()
}

fn create_segment(dir: &Path, header: &SegmentHeader) -> std::io::Result<File> {
    let path = dir.join(segment_file_name(header.seq));
    write_atomic(&path, &header.encode())?;
    let file = OpenOptions::new().append(true).open(&path)?;
    Ok(file)
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir` for `device`: takes the
    /// lock, removes temporary files of an interrupted segment creation,
    /// truncates a torn tail of the newest segment, and starts the writer thread.
    ///
    /// # Errors
    /// [`JournalError::Locked`] when another process writes the journal; I/O
    /// errors naming the path; an unreadable host acknowledgement.
    pub fn open(dir: &Path, device: DeviceId, config: JournalConfig) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(JournalError::io(dir))?;
        let lock = lock(dir)?;
        for entry in std::fs::read_dir(dir).map_err(JournalError::io(dir))? {
            let path = entry.map_err(JournalError::io(dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path).map_err(JournalError::io(&path))?;
            }
        }
        let acked = read_host_ack(dir)?;
        let segments = list_segments(dir)?;
        let mut recovery = Recovery { segments: segments.len(), ..Recovery::default() };
        // Sizes of this device's segments: only those can ever be reclaimed.
        let mut own = BTreeMap::new();
        let mut used = 0;
        for (seq, path) in &segments {
            let bytes = std::fs::metadata(path).map_err(JournalError::io(path))?.len();
            used += bytes;
            if read_header(path).is_some_and(|h| h.device == device && h.seq == *seq) {
                own.insert(*seq, bytes);
            }
        }
        // Appending continues in the newest segment, if it is this device's
        // and intact up to its end. Otherwise (an unreadable or foreign
        // segment, damage reaching the end) those files are left as they are,
        // a new segment is started, and LSNs skip every number the unreadable
        // bytes could hold, so that no LSN is ever given out twice.
        let mut unreadable_bytes = 0;
        let mut append_to = None;
        let mut next_lsn = 1;
        for (seq, path) in segments.iter().rev() {
            let report = read_segment(path, *seq, Some(device), &mut |_| {})?;
            if let Some(problem) = report.problem {
                recovery.skipped.push((path.clone(), problem));
                own.remove(seq);
                unreadable_bytes += report.bytes;
                continue;
            }
            let header = report.header.expect("a segment without a problem has a header");
            if let Some(tail) = report.tail {
                let file = OpenOptions::new().write(true).open(path).map_err(JournalError::io(path))?;
                file.set_len(tail.range.start).and_then(|()| file.sync_all()).map_err(JournalError::io(path))?;
                used -= tail.range.end - tail.range.start;
                own.insert(*seq, tail.range.start);
                recovery.truncated = Some((*seq, tail));
            }
            next_lsn = report.lsns.map_or(header.first_lsn, |(_, last)| last + 1);
            if let Some(d) = report.damage.last().filter(|d| d.range.end == report.bytes) {
                unreadable_bytes += d.range.end - d.range.start;
            }
            if unreadable_bytes == 0 {
                append_to = Some((*seq, path.clone(), report.valid_end));
            }
            recovery.damage = report.damage.into_iter().map(|d| (*seq, d)).collect();
            break;
        }
        if unreadable_bytes > 0 {
            next_lsn += 1 + unreadable_bytes / MIN_RECORD_BYTES;
        }
        let (seq, file, offset) = match append_to {
            Some((seq, path, end)) => {
                // What an earlier process wrote but never synced becomes durable now.
                let file = OpenOptions::new().append(true).open(&path).map_err(JournalError::io(&path))?;
                file.sync_data().map_err(JournalError::io(&path))?;
                (seq, file, end)
            }
            None => {
                let seq = segments.last().map_or(0, |(s, _)| *s).max(acked) + 1;
                let header = SegmentHeader { device, seq, first_lsn: next_lsn, created_ms: now_ms() };
                let file = create_segment(dir, &header).map_err(JournalError::io(dir))?;
                own.insert(seq, HEADER_LEN as u64);
                used += HEADER_LEN as u64;
                (seq, file, HEADER_LEN as u64)
            }
        };
        recovery.active_seq = seq;
        recovery.next_lsn = next_lsn;
        let shared = Arc::new(Shared {
            state: Mutex::new(State { durable: next_lsn - 1, failure: None }),
            changed: Condvar::new(),
            used: AtomicU64::new(used),
            reclaimable: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        });
        let writer = Writer {
            dir: dir.to_path_buf(),
            device,
            config,
            file,
            seq,
            framer: Framer { offset },
            buf: Vec::with_capacity(max_framed_len(RECORD_MAX)),
            written: next_lsn - 1,
            buffered: next_lsn - 1,
            buffered_bound: 0,
            own,
            acked,
            shared: Arc::clone(&shared),
        };
        writer.update_reclaimable();
        let (sender, receiver) = bounded(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("nocturne-journal".into())
            .spawn(move || writer.run(receiver))
            .map_err(JournalError::io(dir))?;
        Ok(Journal {
            sender: Some(sender),
            thread: Some(thread),
            shared,
            next_lsn,
            quota: config.disk_quota_bytes,
            recovery,
            _lock: lock,
        })
    }

    /// What opening found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// LSN the next appended record gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Newest acknowledged LSN (every record up to it is on disk).
    pub fn durable_lsn(&self) -> u64 {
        self.acknowledgements().durable_lsn()
    }

    /// Bytes of segment files on disk.
    pub fn used_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }

    /// Queues a record and returns its LSN. The record is acknowledged once
    /// [`Journal::durable_lsn`] reaches it. Does not allocate and does not
    /// wait for the disk.
    ///
    /// # Errors
    /// An invalid or oversized record; [`JournalError::QuotaFull`] when the
    /// quota has no room even after reclaiming acknowledged segments;
    /// [`JournalError::WriterFailed`] after a write or fsync failure.
    pub fn append(&mut self, body: &Body<'_>) -> Result<u64, JournalError> {
        if let Some(failure) = self.shared.failure() {
            return Err(failure);
        }
        let lsn = self.next_lsn;
        let mut slot = Slot::new();
        slot.resize(RECORD_MAX, 0).expect("RECORD_MAX fits the slot");
        let len = encode(&mut slot, lsn, now_ms(), body)?;
        slot.truncate(len);
        let bound = queued_bound(len);
        let used = self.shared.used.load(Ordering::Acquire);
        let reclaimable = self.shared.reclaimable.load(Ordering::Acquire);
        let queued = self.shared.queued.load(Ordering::Acquire);
        if used + queued + bound > self.quota + reclaimable {
            return Err(JournalError::QuotaFull { used: used + queued, quota: self.quota, unacknowledged: used - reclaimable });
        }
        self.shared.queued.fetch_add(bound, Ordering::AcqRel);
        let sender = self.sender.as_ref().expect("the sender lives until drop");
        if sender.send(Msg::Record(slot)).is_err() {
            return Err(self.shared.failure().unwrap_or_else(|| JournalError::WriterFailed("the writer thread is gone".into())));
        }
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Blocks until `lsn` is acknowledged.
    ///
    /// # Errors
    /// [`JournalError::WriterFailed`] when the writer stopped before that.
    pub fn wait_durable(&self, lsn: u64) -> Result<(), JournalError> {
        self.acknowledgements().wait_durable(lsn)
    }

    /// A handle another thread can wait on for acknowledgements while this
    /// one appends.
    pub fn acknowledgements(&self) -> Acknowledgements {
        Acknowledgements { shared: Arc::clone(&self.shared) }
    }

    /// Appends and waits for the acknowledgement.
    ///
    /// # Errors
    /// Those of [`Journal::append`] and [`Journal::wait_durable`].
    pub fn append_durable(&mut self, body: &Body<'_>) -> Result<u64, JournalError> {
        let lsn = self.append(body)?;
        self.wait_durable(lsn)?;
        Ok(lsn)
    }

    /// Records that the host holds every segment up to `seq`: from now on the
    /// quota may reclaim them. Acknowledging an older segment than before
    /// changes nothing.
    ///
    /// # Errors
    /// `seq` is not sealed (it is the segment being written, or does not
    /// exist yet); the acknowledgement file cannot be written.
    pub fn acknowledge_through(&mut self, seq: u64) -> Result<(), JournalError> {
        let (reply, answer) = bounded(1);
        let sender = self.sender.as_ref().expect("the sender lives until drop");
        sender.send(Msg::Acknowledge(seq, reply)).map_err(|_| JournalError::WriterFailed("the writer thread is gone".into()))?;
        match answer.recv() {
            Ok(result) => result.map_err(JournalError::Acknowledge),
            Err(_) => Err(self.shared.failure().unwrap_or_else(|| JournalError::WriterFailed("the writer thread is gone".into()))),
        }
    }

    /// Seals the segment being written if it holds any record (a new one is
    /// started), so everything appended so far can be exported. Returns the
    /// newest sealed segment (0: none yet).
    ///
    /// # Errors
    /// [`JournalError::WriterFailed`] when the writer failed or fails sealing.
    pub fn seal(&mut self) -> Result<u64, JournalError> {
        let (reply, answer) = bounded(1);
        let sender = self.sender.as_ref().expect("the sender lives until drop");
        let gone = || JournalError::WriterFailed("the writer thread is gone".into());
        sender.send(Msg::Seal(reply)).map_err(|_| self.shared.failure().unwrap_or_else(gone))?;
        match answer.recv() {
            Ok(result) => result.map_err(JournalError::WriterFailed),
            Err(_) => Err(self.shared.failure().unwrap_or_else(gone)),
        }
    }

    /// Writes and syncs everything queued, stops the writer and releases the lock.
    ///
    /// # Errors
    /// [`JournalError::WriterFailed`] if a write or fsync failed at any time.
    pub fn close(mut self) -> Result<(), JournalError> {
        self.stop();
        match self.shared.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    fn stop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                self.shared.fail("the journal writer thread panicked".into());
            }
        }
    }
}

/// Waits for acknowledgements of a [`Journal`] from any thread.
#[derive(Clone)]
pub struct Acknowledgements {
    shared: Arc<Shared>,
}

impl Acknowledgements {
    /// Newest acknowledged LSN.
    pub fn durable_lsn(&self) -> u64 {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).durable
    }

    /// Blocks until `lsn` is acknowledged.
    ///
    /// # Errors
    /// [`JournalError::WriterFailed`] when the writer stopped before that.
    pub fn wait_durable(&self, lsn: u64) -> Result<(), JournalError> {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.durable < lsn {
            if let Some(f) = &state.failure {
                return Err(JournalError::WriterFailed(f.clone()));
            }
            state = self.shared.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }
}

impl Drop for Journal {
    /// Same as [`Journal::close`], errors dropped (they were reported to
    /// whoever waited for an acknowledgement).
    fn drop(&mut self) {
        self.stop();
    }
}

/// The writer thread's state: the only owner of the segment files.
struct Writer {
    dir: PathBuf,
    device: DeviceId,
    config: JournalConfig,
    file: File,
    seq: u64,
    framer: Framer,
    buf: Vec<u8>,
    /// Newest LSN written (synced or not).
    written: u64,
    /// Newest LSN framed into `buf`.
    buffered: u64,
    /// [`queued_bound`] of the records in `buf`.
    buffered_bound: u64,
    /// Sizes of this device's segments, by sequence.
    own: BTreeMap<u64, u64>,
    acked: u64,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Msg>) {
        let mut commit_at: Option<Instant> = None;
        loop {
            let msg = match commit_at {
                Some(at) => match receiver.recv_deadline(at) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match receiver.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
            };
            let result = match msg {
                None => {
                    commit_at = None;
                    self.sync()
                }
                Some(msg) => match self.config.durability {
                    Durability::FsyncEachRecord => self.handle(msg).and_then(|()| self.sync()),
                    Durability::GroupCommit => {
                        // Take what is already queued and write it with one call;
                        // sync when the interval is up, even under steady load.
                        let mut result = self.handle(msg);
                        for _ in 1..DRAIN_MAX {
                            match receiver.try_recv() {
                                Ok(msg) if result.is_ok() => result = self.handle(msg),
                                _ => break,
                            }
                        }
                        let at = *commit_at.get_or_insert_with(|| Instant::now() + self.config.group_commit);
                        result.and_then(|()| self.flush()).and_then(|()| {
                            if Instant::now() < at {
                                return Ok(());
                            }
                            commit_at = None;
                            self.sync()
                        })
                    }
                },
            };
            if let Err(message) = result {
                self.shared.fail(message);
                return;
            }
        }
        if let Err(message) = self.sync() {
            self.shared.fail(message);
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<(), String> {
        match msg {
            Msg::Record(slot) => self.frame(&slot),
            Msg::Acknowledge(seq, reply) => {
                let _ = reply.send(self.acknowledge(seq));
                Ok(())
            }
            Msg::Seal(reply) => {
                let result = if self.framer.offset > HEADER_LEN as u64 {
                    self.roll(self.buffered + 1).map(|()| self.seq - 1)
                } else {
                    Ok(self.seq - 1)
                };
                let _ = reply.send(result.clone());
                result.map(|_| ())
            }
        }
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(segment_file_name(seq))
    }

    /// Frames a record into the write buffer, rolling the segment first if
    /// the record would take it past its size.
    fn frame(&mut self, payload: &[u8]) -> Result<(), String> {
        let lsn = lsn_of(payload).map_err(|e| e.to_string())?;
        assert!(lsn > self.buffered, "LSN order: record {lsn} after {}", self.buffered);
        let start = self.buf.len();
        let mut framer = self.framer;
        framer.frame(payload, &mut self.buf);
        if framer.offset > self.config.segment_bytes && self.framer.offset > HEADER_LEN as u64 {
            self.buf.truncate(start);
            self.roll(lsn)?;
            framer = self.framer;
            framer.frame(payload, &mut self.buf);
        }
        self.framer = framer;
        self.buffered = lsn;
        // Still counted as queued until flush counts its bytes as used.
        self.buffered_bound += queued_bound(payload.len());
        Ok(())
    }

    /// Writes the buffer to the active segment (no sync).
    fn flush(&mut self) -> Result<(), String> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.reclaim(self.buf.len() as u64)?;
        let path = self.path(self.seq);
        self.file.write_all(&self.buf).map_err(|e| format!("write to {} failed: {e}", path.display()))?;
        *self.own.entry(self.seq).or_default() = self.framer.offset;
        // Used first, then no longer queued: the caller's quota check may
        // count these bytes twice for a moment, never zero times.
        self.shared.used.fetch_add(self.buf.len() as u64, Ordering::AcqRel);
        self.shared.queued.fetch_sub(std::mem::take(&mut self.buffered_bound), Ordering::AcqRel);
        self.buf.clear();
        assert!(self.written <= self.buffered, "written {} ≤ buffered {}", self.written, self.buffered);
        self.written = self.buffered;
        Ok(())
    }

    /// fdatasync the active segment and acknowledge what it holds.
    fn sync(&mut self) -> Result<(), String> {
        self.flush()?;
        let durable = self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).durable;
        assert!(
            durable <= self.written && self.written == self.buffered,
            "after a flush, durable {durable} ≤ written {} = buffered {}",
            self.written,
            self.buffered
        );
        if self.written <= durable {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| {
            format!(
                "fdatasync of {} failed: {e}; the journal writer stopped and records after the last acknowledged one are not stored",
                self.path(self.seq).display()
            )
        })?;
        self.shared.publish(self.written);
        Ok(())
    }

    /// Seals the active segment (synced) and starts segment `seq + 1`.
    fn roll(&mut self, first_lsn: u64) -> Result<(), String> {
        self.sync()?;
        let header = SegmentHeader { device: self.device, seq: self.seq + 1, first_lsn, created_ms: now_ms() };
        let path = self.path(header.seq);
        self.file = create_segment(&self.dir, &header).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        self.seq = header.seq;
        self.framer = Framer { offset: HEADER_LEN as u64 };
        self.own.insert(self.seq, HEADER_LEN as u64);
        self.shared.used.fetch_add(HEADER_LEN as u64, Ordering::AcqRel);
        self.update_reclaimable();
        Ok(())
    }

    fn update_reclaimable(&self) {
        let bytes = self.own.range(..=self.acked.min(self.seq.saturating_sub(1))).map(|(_, b)| b).sum();
        self.shared.reclaimable.store(bytes, Ordering::Release);
    }

    /// Deletes the oldest acknowledged sealed segments until `need` more bytes fit the quota.
    fn reclaim(&mut self, need: u64) -> Result<(), String> {
        let mut deleted = false;
        while self.shared.used.load(Ordering::Acquire) + need > self.config.disk_quota_bytes {
            let Some((&seq, &bytes)) = self.own.iter().next().filter(|(s, _)| **s <= self.acked && **s < self.seq) else {
                break;
            };
            assert!(seq < self.seq && seq <= self.acked, "only a sealed, acknowledged segment is reclaimed");
            let path = self.path(seq);
            std::fs::remove_file(&path).map_err(|e| format!("cannot reclaim {}: {e}", path.display()))?;
            self.own.remove(&seq);
            self.shared.used.fetch_sub(bytes, Ordering::AcqRel);
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir).map_err(|e| format!("fsync of {} failed: {e}", self.dir.display()))?;
            self.update_reclaimable();
        }
        Ok(())
    }

    fn acknowledge(&mut self, seq: u64) -> Result<(), String> {
        if seq >= self.seq {
            return Err(format!("segment {seq} is not sealed (the journal is writing segment {})", self.seq));
        }
        if seq <= self.acked {
            return Ok(());
        }
        let path = self.dir.join(HOST_ACK_FILE);
        write_atomic(&path, format!("acknowledged_through_segment {seq}\n").as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.acked = seq;
        self.update_reclaimable();
        Ok(())
    }
}
