//! The device's recall memory on real journals with the real encoder: taught
//! answers come from acknowledged corrections, the index file survives the
//! journal, damage is rebuilt from what the journal holds, the journal is
//! never changed, a full index evicts as documented; documents are cut into
//! passages that are recalled, replaced, kept by a rebuild and removed.

mod support;

use std::path::Path;

use nocturne::device::recall::{RecallMemory, RECALL_INDEX_FILE};
use nocturne::device::StateDir;
use nocturne::heap::Counting;
use nocturne::journal::Journal;
use nocturne::profile::{Durability, EmbeddingPrecision, RecallSpec};
use nocturne::recall::encoder::SentenceEncoder;
use nocturne::recall::index::Origin;
use nocturne::tokenizer::{ChatMessage, Tokenizer};
use nocturne::weights::TOKENIZER_FILE;
use support::journal::{config, correction, interaction, DEVICE};

#[global_allocator]
static GLOBAL: Counting = Counting;

const SPEC: RecallSpec = RecallSpec { max_sequence_tokens: 64, capacity: 100, embedding_precision: EmbeddingPrecision::F16, top_k: 3, prompt_tokens: 256 };

fn encoder() -> SentenceEncoder {
    SentenceEncoder::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/all-minilm-l6-v2"), 64).unwrap()
}

fn decoder_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/smollm2-135m-instruct/int8").join(TOKENIZER_FILE)).unwrap()
}

/// Where the entries recall puts into `question`'s prompt (after a short
/// system message) came from, best first, and the prompt's system message.
fn recall(memory: &RecallMemory, tokenizer: &Tokenizer, question: &str) -> (Vec<Origin>, String) {
    let messages = [ChatMessage::new("system", "You are helpful."), ChatMessage::new("user", question)];
    let recollection = memory.recall_into(&messages, tokenizer, &SPEC).unwrap();
    (recollection.used.into_iter().map(|(e, _)| e.origin).collect(), recollection.prompt.messages[0].content.clone())
}

fn recalled(memory: &RecallMemory, tokenizer: &Tokenizer, question: &str) -> Vec<Origin> {
    recall(memory, tokenizer, question).0
}

/// Every journal file's name and bytes.
fn journal_bytes(state: &StateDir) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(state.journal_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// Journals three questions with corrections (the second corrected twice),
/// and a correction naming no interaction.
fn teach(state: &StateDir) {
    let mut journal = Journal::open(&state.journal_dir(), DEVICE, config(Durability::FsyncEachRecord, 1 << 20, 1 << 30)).unwrap();
    let france = journal.append_durable(&interaction("What is the capital of France?")).unwrap();
    let spider = journal.append_durable(&interaction("How many legs does a spider have?")).unwrap();
    let author = journal.append_durable(&interaction("Who wrote Pride and Prejudice?")).unwrap();
    journal.append_durable(&correction(france, "Paris.")).unwrap();
    journal.append_durable(&correction(spider, "Six.")).unwrap();
    journal.append_durable(&correction(spider, "Eight.")).unwrap();
    journal.append_durable(&correction(author, "Jane Austen.")).unwrap();
    journal.append_durable(&correction(999, "An orphan.")).unwrap();
    journal.close().unwrap();
}

#[test]
fn corrections_in_the_journal_are_recalled_and_the_journal_is_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    teach(&state);
    let before = journal_bytes(&state);
    let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!((report.loaded, report.added, report.orphaned, report.rebuilt.clone()), (0, 3, 1, None), "{report:?}");
    assert_eq!(memory.index().entries().len(), 3, "the later correction of the spider question replaced the earlier");
    let hits = memory.search("spiders: how many legs?", 1, 0.5).unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].0.answer, "Eight.");
    assert_eq!(memory.search("What is the boiling point of water?", 3, 0.5).unwrap().len(), 0, "nothing unrelated clears 0.5");
    assert_eq!(journal_bytes(&state), before, "opening recall memory never changes the journal");
    drop(memory);

    // A second open reads the file and adds nothing.
    let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!((report.loaded, report.added, report.rebuilt), (3, 0, None));
    assert_eq!(memory.index().last_lsn(), 8);
}

#[test]
fn the_index_outlives_the_journal_and_damage_is_rebuilt_from_what_remains() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    teach(&state);
    drop(RecallMemory::open(&state, encoder(), &SPEC).unwrap());
    let index_file = tmp.path().join(RECALL_INDEX_FILE);
    let intact = std::fs::read(&index_file).unwrap();

    // Damaged while the journal still holds everything: rebuilt, nothing lost.
    let mut bad = intact.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&index_file, &bad).unwrap();
    let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert!(report.rebuilt.as_deref().unwrap().contains("checksum"), "{report:?}");
    assert_eq!(report.unrecovered, Some(0));
    assert_eq!(memory.index().entries().len(), 3);
    drop(memory);

    // The segments go (as the quota reclaims them after a host acknowledgement):
    // the index file still answers.
    std::fs::remove_dir_all(state.journal_dir()).unwrap();
    std::fs::create_dir(state.journal_dir()).unwrap();
    let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!((report.loaded, report.rebuilt.clone()), (3, None));
    assert_eq!(memory.search("capital city of France", 1, 0.5).unwrap()[0].0.answer, "Paris.");
    drop(memory);

    // Damaged after the segments went: the report says what could not be recovered.
    std::fs::write(&index_file, &bad).unwrap();
    let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!(report.unrecovered, Some(3), "{report:?}");
    assert!(memory.index().entries().is_empty());
}

#[test]
fn a_full_index_evicts_the_oldest_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    teach(&state);
    let small = RecallSpec { capacity: 2, ..SPEC };
    let (memory, report) = RecallMemory::open(&state, encoder(), &small).unwrap();
    assert_eq!(report.evicted, 1);
    let texts: Vec<_> = memory.index().entries().iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, ["How many legs does a spider have?", "Who wrote Pride and Prejudice?"]);
}

/// `nocturne recall rebuild` and `nocturne recall add` killed (SIGKILL) at
/// random moments, as the journal's crash tests do: the index file is always
/// the old or the new one, never a torn one that would have to be rebuilt.
#[test]
fn a_sigkill_while_the_index_is_written_leaves_a_loadable_index() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    let device = state.device_id_or_create().unwrap();
    let mut journal = Journal::open(&state.journal_dir(), device, config(Durability::FsyncEachRecord, 1 << 20, 1 << 30)).unwrap();
    for i in 0..150 {
        let lsn = journal.append(&interaction(&format!("Where is item number {i} kept in the store?"))).unwrap();
        journal.append(&correction(lsn, &format!("Aisle {}.", i % 12))).unwrap();
    }
    journal.close().unwrap();
    let index_file = tmp.path().join(RECALL_INDEX_FILE);
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/harbour_kiosk.txt");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    // Both commands that write the file: a rebuild, and a document added (its passages replaced).
    for args in [vec!["recall", "rebuild"], vec!["recall", "add", document.to_str().unwrap()]] {
        let run = || {
            std::process::Command::new(env!("CARGO_BIN_EXE_nocturne"))
                .args(&args)
                .args(["--state-dir", tmp.path().to_str().unwrap()])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let started = std::time::Instant::now();
        assert!(run().wait().unwrap().success(), "{args:?}");
        let full = started.elapsed();
        let whole = std::fs::read(&index_file).unwrap();
        for round in 0..20 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut child = run();
            std::thread::sleep(full.mul_f64((seed % 1000) as f64 / 1000.0));
            let _ = child.kill();
            let _ = child.wait();
            let bytes = std::fs::read(&index_file).unwrap_or_else(|e| panic!("{args:?} round {round}: the index file is gone: {e}"));
            // Each run writes the same index again: the file is the old one or the new one, whole.
            assert_eq!(bytes, whole, "{args:?} round {round}: a torn index file");
            let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
            assert_eq!(report.rebuilt, None, "{args:?} round {round}: a torn index file");
            assert_eq!(memory.index().entries().len(), 100, "{args:?} round {round}: the spec's capacity");
        }
    }
}

/// Taught entries outlive their journal segments: the host acknowledges them
/// (`Journal::acknowledge_through`, what `sync import` does with a verified
/// acknowledgement), new records fill the quota so the journal reclaims them,
/// and after a restart the correction is still recalled.
#[test]
fn taught_entries_survive_the_quota_reclaiming_their_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    let small = config(Durability::FsyncEachRecord, 4 * 1024, 32 * 1024);
    let mut journal = Journal::open(&state.journal_dir(), DEVICE, small).unwrap();
    let lsn = journal.append_durable(&interaction("What is the name of the ship's cat?")).unwrap();
    journal.append_durable(&correction(lsn, "The ship's cat is called Biscuit.")).unwrap();
    drop(RecallMemory::open(&state, encoder(), &SPEC).unwrap());
    let sealed = journal.seal().unwrap();
    journal.acknowledge_through(sealed).unwrap();
    let first_segment = std::fs::read_dir(state.journal_dir()).unwrap().map(|e| e.unwrap().file_name()).min().unwrap();
    // Later deliveries are acknowledged too, so the quota can keep taking new records.
    for i in 0..200 {
        journal.append_durable(&interaction(&format!("Filler question {i} that nobody corrects."))).unwrap();
        if i % 20 == 19 {
            let sealed = journal.seal().unwrap();
            journal.acknowledge_through(sealed).unwrap();
        }
    }
    journal.close().unwrap();
    assert!(!state.journal_dir().join(&first_segment).exists(), "the quota reclaimed the acknowledged segment {first_segment:?}");
    let mut earliest = u64::MAX;
    nocturne::journal::read_journal(&state.journal_dir(), None, &mut |r| earliest = earliest.min(r.lsn)).unwrap();
    assert!(earliest > lsn + 1, "the correction's records are gone from the journal (earliest LSN {earliest})");

    let (memory, report) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!((report.loaded, report.rebuilt.clone()), (1, None), "{report:?}");
    let hits = memory.search("what's the ship's cat called?", 1, 0.5).unwrap();
    assert_eq!(hits[0].0.answer, "The ship's cat is called Biscuit.");
}

/// An installed adapter whose manifest lists a correction as learned: recall
/// stops injecting it (kept, marked); a rollback (no adapter) brings it back.
#[test]
fn corrections_an_active_adapter_learned_are_not_recalled_until_it_is_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    teach(&state);
    let tokenizer = decoder_tokenizer();
    let (mut memory, _) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    let spider = memory.search("How many legs does a spider have?", 1, 0.9).unwrap()[0].0.origin.clone();
    let Origin::Taught { interaction, .. } = spider else { panic!("taught") };
    assert_eq!(recalled(&memory, &tokenizer, "How many legs does a spider have?"), std::slice::from_ref(&spider));
    let adapter = nocturne::ids::AdapterId([5; 16]);
    assert_eq!(memory.follow_adapter(Some(adapter), &[interaction], false).unwrap(), 1);
    assert!(recalled(&memory, &tokenizer, "How many legs does a spider have?").is_empty(), "learned: not injected");
    assert_eq!(memory.index().entries().len(), 3, "kept");
    drop(memory);
    // The mark is in the file, so the eviction order knows it after a restart.
    let (mut memory, _) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!(memory.index().entries().iter().filter(|e| e.learned_by == Some(adapter)).count(), 1);
    assert_eq!(memory.follow_adapter(None, &[], false).unwrap(), 0);
    assert_eq!(recalled(&memory, &tokenizer, "How many legs does a spider have?"), [spider], "rolled back: recalled again");
}

/// Two corrections of near-identical questions with different answers: when
/// the adapter learned the one a question is closest to, the other's answer
/// is not recalled over it; the other question still gets its own.
#[test]
fn a_learned_correction_is_not_overridden_by_a_neighbours_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    let tokenizer = decoder_tokenizer();
    let (mut memory, _) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    memory.teach(1, 2, "When will you die?", "Never.").unwrap();
    memory.teach(3, 4, "When do you die?", "I was never born.").unwrap();
    let will = Origin::Taught { interaction: 1, feedback: 2 };
    let other = Origin::Taught { interaction: 3, feedback: 4 };
    let neighbours = memory.search("When will you die?", 2, 0.0).unwrap();
    assert!(neighbours.len() == 2 && neighbours[1].1 >= 0.70, "the two questions are neighbours above the threshold: {neighbours:?}");
    assert_eq!(recalled(&memory, &tokenizer, "When will you die?")[0], will);
    memory.follow_adapter(Some(nocturne::ids::AdapterId([9; 16])), &[1], false).unwrap();
    assert!(recalled(&memory, &tokenizer, "When will you die?").is_empty(), "the adapter answers; the neighbour is not injected");
    assert_eq!(recalled(&memory, &tokenizer, "When do you die?"), [other]);
}

/// A scoped adapter answers the questions it learned and their rewordings,
/// and nothing else (neither an unrelated question nor a taught one it did
/// not learn); an unscoped one, or none, leaves every request to the session.
#[test]
fn a_scoped_adapter_applies_only_to_what_it_learned() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path());
    let tokenizer = decoder_tokenizer();
    let (mut memory, _) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    memory.teach(1, 2, "How many legs does a spider have?", "Eight.").unwrap();
    memory.teach(3, 4, "What is the capital of France?", "Paris.").unwrap();
    let applies = |memory: &RecallMemory, question: &str| {
        let messages = [ChatMessage::new("system", "You are helpful."), ChatMessage::new("user", question)];
        memory.recall_into(&messages, &tokenizer, &SPEC).unwrap().adapter_applies
    };
    let questions = ["How many legs does a spider have?", "How many legs has a spider got?", "What is the capital of France?", "Who wrote Hamlet?"];
    assert_eq!(questions.map(|q| applies(&memory, q)), [true; 4], "no adapter: nothing to set aside");
    let adapter = nocturne::ids::AdapterId([5; 16]);
    memory.follow_adapter(Some(adapter), &[1], false).unwrap();
    assert_eq!(questions.map(|q| applies(&memory, q)), [true; 4], "unscoped: every request");
    memory.follow_adapter(Some(adapter), &[1], true).unwrap();
    assert_eq!(questions.map(|q| applies(&memory, q)), [true, true, false, false], "scoped: the learned question and its rewording");
    assert_eq!(recalled(&memory, &tokenizer, "What is the capital of France?"), [Origin::Taught { interaction: 3, feedback: 4 }], "the unlearned one is recalled");
}

/// A document is cut into passages that are recalled for questions it
/// answers (not for unrelated ones), replaced when added again, kept by a
/// rebuild from the journal, and removed by its name. The questions are not
/// the ones `PASSAGE_THRESHOLD` was tuned on.
#[test]
fn documents_are_recalled_replaced_kept_by_a_rebuild_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path().join("state"));
    teach(&state);
    let document = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/harbour_kiosk.txt")).unwrap();
    let (mut memory, _) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    let (added, evicted) = memory.add_document("harbour_kiosk.txt", &document).unwrap();
    assert_eq!(evicted, 0);
    assert!(added >= 7, "one passage per paragraph at least: {added}");
    for entry in memory.index().entries().iter().filter(|e| matches!(e.origin, Origin::Passage { .. })) {
        assert!(memory.encoder().tokens(&entry.text).unwrap().len() < SPEC.max_sequence_tokens as usize, "passage fits the window: {}", entry.text);
    }
    let tokenizer = decoder_tokenizer();
    let ask = |memory: &RecallMemory, question: &str| {
        let (used, system) = recall(memory, &tokenizer, question);
        (system, used)
    };
    let (system, used) = ask(&memory, "Which pier do the ferries use in winter?");
    assert!(matches!(&used[0], Origin::Passage { source, .. } if source == "harbour_kiosk.txt"), "{used:?}");
    assert!(system.contains("pier one"), "the passage is in the system message: {system}");
    let (_, used) = ask(&memory, "Who painted the Mona Lisa?");
    assert!(used.is_empty(), "an unrelated question recalls nothing: {used:?}");
    // Taught answers still come first for their own questions.
    let (_, used) = ask(&memory, "What is the capital of France?");
    assert!(matches!(used[0], Origin::Taught { .. }), "{used:?}");

    let (again, _) = memory.add_document("harbour_kiosk.txt", "The kiosk is closed for repairs.").unwrap();
    assert_eq!(again, 1);
    let passages = |memory: &RecallMemory| memory.index().entries().iter().filter(|e| matches!(e.origin, Origin::Passage { .. })).count();
    assert_eq!(passages(&memory), 1, "adding a document again replaces its passages");
    drop(memory);

    let (memory, _) = RecallMemory::rebuild(&state, encoder(), &SPEC).unwrap();
    assert_eq!((passages(&memory), memory.index().entries().len()), (1, 4), "the rebuild keeps the passage and the 3 taught answers");
    let mut memory = memory;
    assert_eq!(memory.remove_document("harbour_kiosk.txt").unwrap(), 1);
    assert_eq!(memory.remove_document("harbour_kiosk.txt").unwrap(), 0);
    drop(memory);
    let (memory, _) = RecallMemory::open(&state, encoder(), &SPEC).unwrap();
    assert_eq!(passages(&memory), 0, "the removal is in the file");
}
