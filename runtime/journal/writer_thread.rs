//! The journal's writer thread: the only owner of the segment files. It
//! frames queued records into block-aligned chunks, writes them, fdatasyncs
//! by the profile's durability policy (each record, or group commit),
//! acknowledges, rolls segments, applies host acknowledgements, and keeps
//! the disk quota by reclaiming acknowledged segments.
//!
//! Principal types: `Writer`, `Shared` (what the [`super::Journal`] handle
//! and the thread share), [`WriterError`].
//!
//! Invariants (asserted where they change): LSNs are framed in increasing
//! order; `durable ≤ written ≤ buffered`, and after a flush
//! `written = buffered`; an LSN becomes durable only after `fdatasync` of its
//! segment returned; a failed write or fsync stops the thread for good (no
//! retry, after PostgreSQL's fsyncgate); only a sealed segment the host
//! acknowledged is deleted, and only when the quota needs the space.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::directory::{create_segment, write_host_ack};
use super::record::{lsn_of, now_ms, RecordError, RECORD_MAX};
use super::segment::{max_framed_len, segment_file_name, Framer, SegmentHeader, HEADER_LEN};
use super::writer::{JournalConfig, QUEUE_DEPTH};
use super::JournalError;
use crate::durable_file::sync_dir;
use crate::ids::DeviceId;
use crate::profile::Durability;

/// Most queued records the group-commit writer frames into one write.
const DRAIN_MAX: usize = 2 * QUEUE_DEPTH;

/// Why the writer thread failed or refused a request. Cloned to every later
/// caller once the writer stopped.
#[derive(Clone, Debug, thiserror::Error)]
pub enum WriterError {
    /// A file operation failed (`action` is what was being done).
    #[error("{action} {} failed: {source}", path.display())]
    Io {
        /// What was being done: "write to", "fdatasync of", "create", "reclaim", "fsync of", "write".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A queued record does not decode (a bug in the caller's encoding).
    #[error("a queued record is malformed: {0}")]
    Record(#[from] RecordError),
    /// A host acknowledgement names a segment that is not sealed.
    #[error("segment {seq} is not sealed (the journal is writing segment {writing})")]
    NotSealed {
        /// The acknowledged segment.
        seq: u64,
        /// The segment being written.
        writing: u64,
    },
    /// The writer thread is gone (it panicked, or the journal is closing).
    #[error("the writer thread is gone")]
    Gone,
}

impl WriterError {
    fn io<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> WriterError + 'p {
        move |source| WriterError::Io { action, path: path.to_path_buf(), source: Arc::new(source) }
    }
}

pub(super) type Slot = heapless::Vec<u8, RECORD_MAX>;

// A record travels inline in its message, so appending never allocates.
#[allow(clippy::large_enum_variant)]
pub(super) enum Msg {
    Record(Slot),
    Acknowledge(u64, Sender<Result<(), WriterError>>),
    Seal(Sender<Result<u64, WriterError>>),
}

pub(super) struct Shared {
    pub state: Mutex<State>,
    pub changed: Condvar,
    /// Bytes of segment files on disk.
    pub used: AtomicU64,
    /// Of those, bytes of sealed segments the host acknowledged.
    pub reclaimable: AtomicU64,
    /// Upper bound of the bytes of records queued but not yet written.
    pub queued: AtomicU64,
}

#[derive(Default)]
pub(super) struct State {
    pub durable: u64,
    pub failure: Option<WriterError>,
}

impl Shared {
    /// The shared state of a journal whose LSNs up to `durable` are durable
    /// and whose segments take `used` bytes.
    pub fn new(durable: u64, used: u64) -> Shared {
        Shared {
            state: Mutex::new(State { durable, failure: None }),
            changed: Condvar::new(),
            used: AtomicU64::new(used),
            reclaimable: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        }
    }

    pub fn publish(&self, lsn: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.durable = state.durable.max(lsn);
        self.changed.notify_all();
    }

    pub fn fail(&self, error: WriterError) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failure.get_or_insert(error);
        self.changed.notify_all();
    }

    pub fn failure(&self) -> Option<JournalError> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.failure.clone().map(JournalError::WriterFailed)
    }
}

/// Most disk bytes a `len`-byte record can add: its framing, and the header
/// of a new segment if it starts one.
pub(super) fn queued_bound(len: usize) -> u64 {
    (max_framed_len(len) + HEADER_LEN) as u64
}

/// The writer thread's state: the only owner of the segment files.
pub(super) struct Writer {
    pub dir: PathBuf,
    pub device: DeviceId,
    pub config: JournalConfig,
    pub file: File,
    pub seq: u64,
    pub framer: Framer,
    pub buf: Vec<u8>,
    /// Newest LSN written (synced or not).
    pub written: u64,
    /// Newest LSN framed into `buf`.
    pub buffered: u64,
    /// [`queued_bound`] of the records in `buf`.
    pub buffered_bound: u64,
    /// Sizes of this device's segments, by sequence.
    pub own: BTreeMap<u64, u64>,
    pub acked: u64,
    pub shared: Arc<Shared>,
}

impl Writer {
    /// The thread's loop: until every sender is gone, then a final sync.
    pub fn run(mut self, receiver: Receiver<Msg>) {
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
            if let Err(error) = result {
                self.shared.fail(error);
                return;
            }
        }
        if let Err(error) = self.sync() {
            self.shared.fail(error);
        }
    }

    fn handle(&mut self, msg: Msg) -> Result<(), WriterError> {
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
    fn frame(&mut self, payload: &[u8]) -> Result<(), WriterError> {
        let lsn = lsn_of(payload)?;
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
    fn flush(&mut self) -> Result<(), WriterError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.reclaim(self.buf.len() as u64)?;
        let path = self.path(self.seq);
        self.file.write_all(&self.buf).map_err(WriterError::io("write to", &path))?;
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
    fn sync(&mut self) -> Result<(), WriterError> {
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
        self.file.sync_data().map_err(WriterError::io("fdatasync of", &self.path(self.seq)))?;
        self.shared.publish(self.written);
        Ok(())
    }

    /// Seals the active segment (synced) and starts segment `seq + 1`.
    fn roll(&mut self, first_lsn: u64) -> Result<(), WriterError> {
        self.sync()?;
        let header = SegmentHeader { device: self.device, seq: self.seq + 1, first_lsn, created_ms: now_ms() };
        let path = self.path(header.seq);
        self.file = create_segment(&self.dir, &header).map_err(WriterError::io("create", &path))?;
        self.seq = header.seq;
        self.framer = Framer { offset: HEADER_LEN as u64 };
        self.own.insert(self.seq, HEADER_LEN as u64);
        self.shared.used.fetch_add(HEADER_LEN as u64, Ordering::AcqRel);
        self.update_reclaimable();
        Ok(())
    }

    /// Publishes the bytes the quota may reclaim.
    pub fn update_reclaimable(&self) {
        let bytes = self.own.range(..=self.acked.min(self.seq.saturating_sub(1))).map(|(_, b)| b).sum();
        self.shared.reclaimable.store(bytes, Ordering::Release);
    }

    /// Deletes the oldest acknowledged sealed segments until `need` more bytes fit the quota.
    fn reclaim(&mut self, need: u64) -> Result<(), WriterError> {
        let mut deleted = false;
        while self.shared.used.load(Ordering::Acquire) + need > self.config.disk_quota_bytes {
            let Some((&seq, &bytes)) = self.own.iter().next().filter(|(s, _)| **s <= self.acked && **s < self.seq) else {
                break;
            };
            assert!(seq < self.seq && seq <= self.acked, "only a sealed, acknowledged segment is reclaimed");
            let path = self.path(seq);
            std::fs::remove_file(&path).map_err(WriterError::io("reclaim", &path))?;
            self.own.remove(&seq);
            self.shared.used.fetch_sub(bytes, Ordering::AcqRel);
            deleted = true;
        }
        if deleted {
            sync_dir(&self.dir).map_err(WriterError::io("fsync of", &self.dir))?;
            self.update_reclaimable();
        }
        Ok(())
    }

    fn acknowledge(&mut self, seq: u64) -> Result<(), WriterError> {
        if seq >= self.seq {
            return Err(WriterError::NotSealed { seq, writing: self.seq });
        }
        if seq <= self.acked {
            return Ok(());
        }
        write_host_ack(&self.dir, seq).map_err(WriterError::io("write", &self.dir.join(super::directory::HOST_ACK_FILE)))?;
        self.acked = seq;
        self.update_reclaimable();
        Ok(())
    }
}
