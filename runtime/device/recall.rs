//! The device's recall memory: the index file in the state directory
//! (`recall.idx`, see [`crate::recall::index`]) kept in step with the journal.
//!
//! Principal items: [`RecallMemory`], [`Recollection`], [`OpenReport`],
//! [`RECALL_INDEX_FILE`].
//!
//! At open the file is checked and topped up from the journal records after
//! its last LSN: every feedback record with a correction becomes a taught
//! entry (question: the corrected interaction's user message; answer: the
//! correction), a later correction of the same interaction replacing the
//! earlier one. A missing or damaged file is rebuilt from what the journal
//! still holds, and the report says how many entries the damaged file had
//! that could not be recovered; a file built with another encoder is embedded
//! again from its own texts. Feedback whose interaction is not in the journal
//! (reclaimed, or never written) is counted, not an error.
//!
//! Invariants: the journal is only read, never changed; the index file is
//! replaced atomically, so a crash while writing leaves the old or the new
//! file; entries outlive the journal segments they came from.

use std::collections::HashMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::durable_file::{sync_dir, write_atomic};
use crate::file_error::FileError;
use crate::ids::AdapterId;
use crate::file_read::read_bounded;
use crate::journal::{read_journal, Body, JournalError};
use crate::kernels::Kernels;
use crate::profile::RecallSpec;
use crate::recall::encoder::{EncoderError, SentenceEncoder};
use crate::recall::index::{Entry, Hit, IndexFileError, Origin, RecallIndex};
use crate::recall::passages::split;
use crate::recall::prompt::{threshold, with_recalled, RecallForm, RecalledPrompt, DEFAULT_THRESHOLD, PASSAGE_THRESHOLD};
use crate::recall::scope::in_adapter_scope;
use crate::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

use super::StateDir;

/// Name of the recall index file in the state directory.
pub const RECALL_INDEX_FILE: &str = "recall.idx";

/// Largest index file read, bytes (1 GiB).
const INDEX_FILE_LIMIT: u64 = 1 << 30;

/// The text whose embedding fingerprints an encoder: two encoders that embed
/// it identically are taken to be the same.
const PROBE: &str = "nocturne recall probe: the quick brown fox jumps over the lazy dog";

/// Opening or updating recall memory failed.
#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    /// The encoder failed.
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The decoder's tokenizer failed on a recalled text.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The index file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The index file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// What [`RecallMemory::open`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Entries read from the index file.
    pub loaded: usize,
    /// Why the file was not used as it was: `None` when it was.
    pub rebuilt: Option<String>,
    /// Entries the damaged file held that the journal no longer has (when
    /// its header still said how many it held).
    pub unrecovered: Option<usize>,
    /// Taught entries added from journal records after the file's last LSN.
    pub added: usize,
    /// Feedback corrections whose interaction is not in the journal.
    pub orphaned: usize,
    /// Entries evicted because the index was full.
    pub evicted: usize,
}

/// The recall index of one state directory, with the encoder that fills it.
pub struct RecallMemory {
    encoder: SentenceEncoder,
    index: RecallIndex,
    path: PathBuf,
    kernels: Kernels,
    /// The active adapter is scoped ([`crate::recall::scope`]).
    scoped: bool,
}

/// What recall gives a request ([`RecallMemory::recall_into`]).
#[derive(Debug)]
pub struct Recollection {
    /// The messages with what was recalled.
    pub prompt: RecalledPrompt,
    /// The entries that went in, best first, with their similarity.
    pub used: Vec<(Entry, f32)>,
    /// Whether the active adapter answers this request: always for an
    /// unscoped adapter, else when the request is in its scope
    /// ([`in_adapter_scope`]).
    pub adapter_applies: bool,
}

impl RecallMemory {
    /// Opens the index of `state` for `encoder`, sized by `spec`, and tops it
    /// up from the journal (module docs). Writes the file when anything changed.
    ///
    /// # Errors
    /// The encoder failing on a text, the journal directory unreadable, or the
    /// index file unwritable. A damaged file is not an error: it is rebuilt.
    pub fn open(state: &StateDir, encoder: SentenceEncoder, spec: &RecallSpec) -> Result<(RecallMemory, OpenReport), RecallError> {
        RecallMemory::open_or_rebuild(state, encoder, spec, false)
    }

    /// Builds the taught entries of `state`'s index from the journal alone
    /// (the passages of a readable index file are kept: documents are not
    /// journaled), and replaces the file atomically (a crash leaves the old one).
    ///
    /// # Errors
    /// As [`RecallMemory::open`].
    pub fn rebuild(state: &StateDir, encoder: SentenceEncoder, spec: &RecallSpec) -> Result<(RecallMemory, OpenReport), RecallError> {
        RecallMemory::open_or_rebuild(state, encoder, spec, true)
    }

    fn open_or_rebuild(state: &StateDir, encoder: SentenceEncoder, spec: &RecallSpec, rebuild: bool) -> Result<(RecallMemory, OpenReport), RecallError> {
        let fingerprint = fingerprint(&encoder)?;
        let (dimension, capacity) = (encoder.dimension(), spec.capacity as usize);
        let path = state.root().join(RECALL_INDEX_FILE);
        let mut report = OpenReport::default();
        let fresh = || RecallIndex::new(fingerprint, dimension, capacity, spec.embedding_precision);
        let index = match read_bounded(&path, INDEX_FILE_LIMIT) {
            Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => fresh(),
            Err(e) => {
                report.rebuilt = Some(format!("{e}"));
                fresh()
            }
            Ok(bytes) => match RecallIndex::decode(&bytes, fingerprint, dimension, capacity, spec.embedding_precision) {
                Ok(index) if rebuild => {
                    // Passages are not in the journal: a rebuild keeps them.
                    let mut kept = fresh();
                    for (slot, entry) in index.entries().iter().enumerate().filter(|(_, e)| is_passage(e)) {
                        kept.add(entry.clone(), &index.embedding(slot));
                    }
                    report.loaded = kept.entries().len();
                    kept
                }
                Ok(index) => {
                    report.loaded = index.entries().len();
                    index
                }
                Err(IndexFileError::Stale { entries, last_lsn }) => {
                    report.rebuilt = Some("built with another encoder: embedded again".into());
                    let mut index = fresh();
                    for entry in entries.into_iter().filter(|e| !rebuild || is_passage(e)) {
                        let embedding = encoder.embed(&entry.text)?;
                        report.evicted += usize::from(index.add(entry, &embedding).is_some());
                    }
                    if !rebuild {
                        index.set_last_lsn(last_lsn);
                    }
                    report.loaded = index.entries().len();
                    index
                }
                Err(damaged @ IndexFileError::Damaged(_)) => {
                    report.rebuilt = Some(damaged.to_string());
                    report.unrecovered = RecallIndex::entry_count_of(&bytes);
                    fresh()
                }
            },
        };
        let mut memory = RecallMemory { encoder, index, path, kernels: Kernels::detect(), scoped: false };
        let changed = memory.top_up(state, &mut report)? || report.rebuilt.is_some() || rebuild;
        if let (Some(lost), true) = (report.unrecovered, report.rebuilt.is_some()) {
            report.unrecovered = Some(lost.saturating_sub(memory.index.entries().len()));
        }
        if changed {
            memory.save()?;
        }
        Ok((memory, report))
    }

    /// Tops the index up from the journal records after its last LSN, as
    /// [`RecallMemory::open`] does, and writes the file when anything was
    /// added: for a process that learns of a correction by its LSN alone
    /// (the local API's feedback). Reads the whole journal for the corrected
    /// interactions' questions.
    ///
    /// # Errors
    /// The encoder, the journal directory or the index file failing.
    pub fn catch_up(&mut self, state: &StateDir) -> Result<OpenReport, RecallError> {
        let mut report = OpenReport::default();
        if self.top_up(state, &mut report)? {
            self.save()?;
        }
        Ok(report)
    }

    /// Adds the taught entries of the journal records after the index's last LSN.
    fn top_up(&mut self, state: &StateDir, report: &mut OpenReport) -> Result<bool, RecallError> {
        let after = self.index.last_lsn();
        let mut questions: HashMap<u64, String> = HashMap::new();
        let mut corrections: Vec<(u64, u64, String)> = Vec::new();
        let mut last = after;
        let journal = state.journal_dir();
        if !journal.is_dir() {
            return Ok(false);
        }
        read_journal(&journal, None, &mut |record| {
            last = last.max(record.lsn);
            match &record.body {
                Body::Interaction(i) => {
                    questions.insert(record.lsn, i.prompt.to_string());
                }
                Body::Feedback(f) if record.lsn > after => {
                    if let Some(answer) = f.correction.as_deref().filter(|a| !a.trim().is_empty()) {
                        corrections.push((f.interaction, record.lsn, answer.to_owned()));
                    }
                }
                _ => {}
            }
        })?;
        // The latest correction of an interaction wins; of more new
        // corrections than the capacity only the newest can stay (each new
        // entry evicts an older one), so only those are embedded.
        let mut latest: HashMap<u64, usize> = HashMap::new();
        for (i, (interaction, _, _)) in corrections.iter().enumerate() {
            latest.insert(*interaction, i);
        }
        let mut kept: Vec<(u64, u64, String)> =
            corrections.into_iter().enumerate().filter(|(i, c)| latest[&c.0] == *i).map(|(_, c)| c).collect();
        let (orphans, known): (Vec<_>, Vec<_>) = kept.drain(..).partition(|c| !questions.contains_key(&c.0));
        report.orphaned += orphans.len();
        let skip = known.len().saturating_sub(self.index.capacity());
        report.evicted += skip;
        for (interaction, feedback, answer) in known.into_iter().skip(skip) {
            let evicted = self.teach(interaction, feedback, &questions[&interaction], &answer)?;
            report.added += 1;
            report.evicted += usize::from(evicted.is_some());
        }
        let moved = last > after;
        self.index.set_last_lsn(last);
        Ok(moved)
    }

    /// Adds (or replaces) the taught entry for `interaction`: `question` was
    /// answered with `answer` in the feedback record `feedback`. Returns the
    /// entry evicted to make room, if one was. Does not write the file
    /// ([`RecallMemory::save`]).
    ///
    /// # Errors
    /// The encoder failing.
    pub fn teach(&mut self, interaction: u64, feedback: u64, question: &str, answer: &str) -> Result<Option<Entry>, RecallError> {
        let embedding = self.encoder.embed(question)?;
        self.index.retain(|e| !matches!(e.origin, Origin::Taught { interaction: i, .. } if i == interaction));
        let entry = Entry { origin: Origin::Taught { interaction, feedback }, text: question.to_owned(), answer: answer.to_owned(), learned_by: None };
        let evicted = self.index.add(entry, &embedding);
        self.index.set_last_lsn(feedback);
        Ok(evicted)
    }

    /// Indexes `text` as the document `source` (its provenance: the file as
    /// the user named it), cut into passages that fit the encoder's window
    /// ([`crate::recall::passages::split`]); the passages an earlier `source`
    /// of the same name gave are replaced. Writes the file. Returns the
    /// passages added and the entries evicted to make room.
    ///
    /// # Errors
    /// The encoder failing, or the index file unwritable.
    pub fn add_document(&mut self, source: &str, text: &str) -> Result<(usize, usize), RecallError> {
        let window = self.encoder.graph().max_sequence();
        let passages = split(text, window, |t| self.encoder.tokens(t).map(|ids| ids.len()))?;
        let embeddings = passages.iter().map(|p| self.encoder.embed(p)).collect::<Result<Vec<_>, _>>()?;
        self.index.retain(|e| !matches!(&e.origin, Origin::Passage { source: s, .. } if s == source));
        let mut evicted = 0;
        for (number, (passage, embedding)) in passages.into_iter().zip(&embeddings).enumerate() {
            let entry = Entry { origin: Origin::Passage { source: source.to_owned(), number: number as u32 }, text: passage, answer: String::new(), learned_by: None };
            evicted += usize::from(self.index.add(entry, embedding).is_some());
        }
        self.save()?;
        Ok((embeddings.len(), evicted))
    }

    /// Removes every passage of the document `source`; writes the file when
    /// one went. Returns how many went.
    ///
    /// # Errors
    /// [`RecallError::Io`].
    pub fn remove_document(&mut self, source: &str) -> Result<usize, RecallError> {
        let removed = self.index.retain(|e| !matches!(&e.origin, Origin::Passage { source: s, .. } if s == source));
        if removed > 0 {
            self.save()?;
        }
        Ok(removed)
    }

    /// The entries closest to `question` (learned ones included): at most `k`, each with a score of at
    /// least `threshold`, best first.
    ///
    /// # Errors
    /// The encoder failing.
    pub fn search(&self, question: &str, k: usize, threshold: f32) -> Result<Vec<(&Entry, f32)>, RecallError> {
        let query = self.encoder.embed(question)?;
        let mut hits: Vec<Hit> = Vec::with_capacity(k);
        self.index.search(&self.kernels, &query, k, threshold, &mut hits);
        Ok(hits.iter().map(|h| (&self.index.entries()[h.slot], h.score)).collect())
    }

    /// `messages` (system first, the conversation ending with the user's
    /// message) with what recall finds for that last user message: at most
    /// `spec.top_k` entries with a similarity of at least
    /// [`DEFAULT_THRESHOLD`] (taught answers) or [`PASSAGE_THRESHOLD`]
    /// (document passages), none the active adapter learned, and no taught
    /// entry at all when the closest one is learned (the adapter answers),
    /// within `spec.prompt_tokens`, in
    /// [`RecallForm::DEFAULT`]; the entries that went in, best first, with
    /// their similarity; and whether the active adapter answers (module
    /// [`crate::recall::scope`]).
    ///
    /// # Errors
    /// The encoder or the tokenizer failing.
    pub fn recall_into(&self, messages: &[ChatMessage], tokenizer: &Tokenizer, spec: &RecallSpec) -> Result<Recollection, RecallError> {
        let question = messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str());
        let (hits, learned) = if question.trim().is_empty() {
            (Vec::new(), false)
        } else {
            let lowest = DEFAULT_THRESHOLD.min(PASSAGE_THRESHOLD);
            let mut hits = self.search(question, spec.top_k as usize, lowest)?;
            // The closest taught entry is one the active adapter learned: the
            // adapter answers the question, and a neighbour's answer (another
            // correction of a similar question) must not override it.
            let learned = in_adapter_scope(hits.iter().copied());
            hits.retain(|(e, s)| *s >= threshold(&e.origin) && e.learned_by.is_none() && !(learned && matches!(e.origin, Origin::Taught { .. })));
            (hits, learned)
        };
        let entries: Vec<&Entry> = hits.iter().map(|(e, _)| *e).collect();
        let prompt = with_recalled(messages, &entries, RecallForm::DEFAULT, spec.prompt_tokens as usize, tokenizer)?;
        let used = prompt.used.iter().map(|&i| (hits[i].0.clone(), hits[i].1)).collect();
        Ok(Recollection { prompt, used, adapter_applies: learned || !self.scoped })
    }

    /// Marks the taught entries whose interaction is in `learned` as learned
    /// by `adapter` (the active adapter's manifest lists them), and clears the
    /// mark of every other entry: a rolled-back adapter's entries come back.
    /// `scoped`: the adapter applies only in its scope
    /// ([`crate::recall::scope`]). Writes the file when a mark changed.
    /// Returns how many are marked.
    ///
    /// # Errors
    /// [`RecallError::Io`].
    pub fn follow_adapter(&mut self, adapter: Option<AdapterId>, learned: &[u64], scoped: bool) -> Result<usize, RecallError> {
        self.scoped = scoped && adapter.is_some();
        let before: Vec<Option<AdapterId>> = self.index.entries().iter().map(|e| e.learned_by).collect();
        let marked = self.index.mark_learned(|e| match e.origin {
            Origin::Taught { interaction, .. } if learned.contains(&interaction) => adapter,
            _ => None,
        });
        if self.index.entries().iter().map(|e| e.learned_by).ne(before) {
            self.save()?;
        }
        Ok(marked)
    }

    /// [`RecallMemory::follow_adapter`] for the adapter active in `state`
    /// (none: every mark cleared), with the learned list and scope its
    /// verified manifest gives for this device.
    ///
    /// # Errors
    /// The adapter state or the installed manifest cannot be read or verified.
    pub fn follow_active_adapter(&mut self, state: &StateDir) -> Result<usize, RecallError> {
        let io = |e: FileError| RecallError::Io { path: state.root().to_owned(), source: std::io::Error::other(e.to_string()) };
        let Some(active) = super::adapters::ActiveAdapters::read(state).map_err(io)?.active else {
            return self.follow_adapter(None, &[], false);
        };
        let device = state.device_id().map_err(io)?;
        let manifest = super::adapters::installed_manifest(state, active, &state.trainer_key().map_err(io)?).map_err(io)?;
        let learned = device.map(|d| manifest.learned(d)).unwrap_or_default();
        self.follow_adapter(Some(active), &learned, manifest.scoped())
    }

    /// Bytes this recall memory adds to the memory plan
    /// ([`crate::recall::plan_bytes`]).
    pub fn plan_bytes(&self) -> usize {
        crate::recall::plan_bytes(self.encoder.graph(), self.index.embedding_bytes())
    }

    /// The index.
    pub fn index(&self) -> &RecallIndex {
        &self.index
    }

    /// The encoder.
    pub fn encoder(&self) -> &SentenceEncoder {
        &self.encoder
    }

    /// Writes the index file atomically (creating the state directory when
    /// there is none yet).
    ///
    /// # Errors
    /// [`RecallError::Io`].
    pub fn save(&self) -> Result<(), RecallError> {
        let io = |source| RecallError::Io { path: self.path.clone(), source };
        // A state directory made here (`recall add` before any journal) is made durable too.
        if let Some(dir) = self.path.parent().filter(|d| !d.is_dir()) {
            std::fs::create_dir_all(dir).map_err(io)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io)?;
            }
        }
        write_atomic(&self.path, &self.index.encode()).map_err(io)
    }
}

fn is_passage(entry: &Entry) -> bool {
    matches!(entry.origin, Origin::Passage { .. })
}

/// SHA-256 of the encoder's dimension and its embedding of [`PROBE`].
fn fingerprint(encoder: &SentenceEncoder) -> Result<[u8; 32], EncoderError> {
    let probe = encoder.embed(PROBE)?;
    let mut hash = Sha256::new();
    hash.update((probe.len() as u64).to_le_bytes());
    probe.iter().for_each(|v| hash.update(v.to_le_bytes()));
    Ok(hash.finalize().into())
}
