//! The journal handle: opening (lock, recovery, the writer thread),
//! appending, waiting for acknowledgements, sealing, host acknowledgements.
//!
//! Principal types: [`Journal`], [`JournalConfig`], [`Acknowledgements`].
//!
//! Invariants:
//! - One writer per directory at a time ([`super::directory`]'s `LOCK`).
//! - [`Journal::append`] encodes into a fixed-capacity buffer and hands it to
//!   the writer thread ([`super::writer_thread`]) through a bounded channel:
//!   it neither allocates nor touches the disk (it waits only when the queue
//!   of [`QUEUE_DEPTH`] records is full).
//! - An LSN is acknowledged (returned by [`Journal::durable_lsn`], and
//!   [`Journal::wait_durable`] returns) only after `fdatasync` on its segment
//!   returned success. A failed write or fsync stops the writer for good and
//!   every later call reports it; nothing is retried (PostgreSQL's
//!   "fsyncgate", 2018: after a failed fsync the kernel may have dropped the
//!   dirty pages, so a retry that succeeds proves nothing).
//! - Segments are created complete: header written to a temporary file,
//!   fsynced, renamed, directory fsynced.
//! - Recovery ([`super::recovery`]) truncates only the incomplete tail of the
//!   newest segment; LSNs are never reused.
//! - Only sealed segments the host acknowledged are ever deleted, and only
//!   when the quota needs the space; when it cannot be found the record is
//!   refused with [`JournalError::QuotaFull`].

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};

use super::directory::{lock, remove_temporary_files};
use super::record::{encode, now_ms, Body, RECORD_MAX};
use super::recovery::{recover, Recovery};
use super::segment::{max_framed_len, Framer};
use super::writer_thread::{queued_bound, Msg, Shared, Slot, Writer, WriterError};
use super::JournalError;
use crate::ids::DeviceId;
use crate::profile::{Durability, Profile};

/// Records that can wait for the writer thread before `append` blocks.
pub const QUEUE_DEPTH: usize = 8;

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
        remove_temporary_files(dir)?;
        let r = recover(dir, device)?;
        let next_lsn = r.next_lsn;
        let shared = Arc::new(Shared::new(next_lsn - 1, r.used));
        let writer = Writer {
            dir: dir.to_path_buf(),
            device,
            config,
            file: r.file,
            seq: r.seq,
            framer: Framer { offset: r.offset },
            buf: Vec::with_capacity(max_framed_len(RECORD_MAX)),
            written: next_lsn - 1,
            buffered: next_lsn - 1,
            buffered_bound: 0,
            own: r.own,
            acked: r.acked,
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
            recovery: r.recovery,
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
            return Err(self.shared.failure().unwrap_or(JournalError::WriterFailed(WriterError::Gone)));
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
        sender.send(Msg::Acknowledge(seq, reply)).map_err(|_| JournalError::WriterFailed(WriterError::Gone))?;
        match answer.recv() {
            Ok(result) => result.map_err(JournalError::Acknowledge),
            Err(_) => Err(self.shared.failure().unwrap_or(JournalError::WriterFailed(WriterError::Gone))),
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
        let gone = || JournalError::WriterFailed(WriterError::Gone);
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
                self.shared.fail(WriterError::Gone);
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

