//! Recall memory on real data, no night: corrections work from the next
//! question on.
//!
//! 1. chatterbot-corpus questions (as `scripts/scenario` uses them) are
//!    asked on the device (greedy, the default system prompt, int8 pack);
//!    the first TUNE + TEST answered differently from the corpus are
//!    corrected through the device's journal (interaction + correction
//!    records), and recall memory is opened on that state directory (the
//!    corrections come in from the journal, as at any start).
//! 2. Tuning, on the TUNE corrections, the tuning rephrasing templates and
//!    the tuning half of the locality questions only: every form × threshold
//!    of a grid is scored, and the one with the most answered as taught
//!    (asked again plus rephrased) whose locality is ≥ 95% is chosen, the
//!    higher threshold on a tie.
//! 3. Report, on the TEST corrections, the report templates (never tuned on)
//!    and the other half of the locality questions: answered as taught when
//!    asked again, when asked rephrased, and locality (never-taught questions
//!    whose answer is unchanged), with recall off and on; embedding time and
//!    first-token time with recall on against off. The rephrased rate is
//!    also given for `paraphrases.txt`: a paraphrase written by hand for each
//!    of the 40 default test questions (question, tab, paraphrase; written
//!    after the tuning was fixed, never tuned on); a test question without
//!    one is left out of that rate and counted.
//!
//! Locality questions: at least 150 chatterbot questions that were not corrected and
//! `trainer/data/general_questions.txt` (50 general-knowledge questions written for this
//! evaluation), split alternately into the tuning and report halves.
//!
//! `cargo run --release -p nocturne-trainer --example recall_eval -- [OUT] [TEST] [TUNE]`
//! (defaults `target/recall-eval`, 40, 20). Writes OUT/recall.json and prints
//! the tables.

// The scenario's dataset pins and parsers (this evaluation uses the chatterbot part).
#[allow(dead_code)]
#[path = "../scenario/datasets.rs"]
mod datasets;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use datasets::{chatterbot_pairs, CHATTERBOT};
use nocturne::device::recall::RecallMemory;
use nocturne::device::StateDir;
use nocturne::journal::{Body, Feedback, Interaction, Journal, JournalConfig};
use nocturne::recall::encoder::SentenceEncoder;
use nocturne::recall::index::Entry;
use nocturne::recall::prompt::{with_recalled, RecallForm};
use nocturne::tokenizer::{ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT};
use nocturne::weights::{ModelPack, TOKENIZER_FILE};
use nocturne_trainer::eval::{device_profile, normalise, Evaluator};
use nocturne_trainer::replay::Example;

/// Rephrasings the tuning sees.
fn tune_rephrase(i: usize, q: &str) -> String {
    if i.is_multiple_of(2) {
        format!("Quick question: {}", lower_first(q))
    } else {
        format!("{q} Please answer briefly.")
    }
}

/// Rephrasings only the report sees.
fn report_rephrase(i: usize, q: &str) -> String {
    if i.is_multiple_of(2) {
        format!("Hey, I was wondering: {}", lower_first(q))
    } else {
        format!("Tell me something. {q}")
    }
}

fn lower_first(q: &str) -> String {
    let mut chars = q.chars();
    chars.next().map_or(String::new(), |c| c.to_lowercase().collect::<String>() + chars.as_str())
}

/// Answered as taught: exact, normalised, or containing the taught answer.
fn as_taught(reply: &str, taught: &str) -> bool {
    let (r, t) = (normalise(reply), normalise(taught));
    reply == taught || r == t || (!t.is_empty() && r.contains(&t))
}

fn example(messages: Vec<ChatMessage>) -> Example {
    Example {
        device: Default::default(),
        interaction: 0,
        time_ms: 0,
        messages,
        target: String::new(),
        reply: String::new(),
        corrected: false,
        implicit: 0.0,
        explicit: 0.0,
        priority: 1.0,
    }
}

/// The device answering with recall in a given form and threshold.
struct Device<'a> {
    evaluator: Evaluator<'a>,
    tokenizer: &'a Tokenizer,
    memory: RecallMemory,
    top_k: usize,
    budget: usize,
    /// Search results per question at the lowest threshold of the grid.
    hits: HashMap<String, Vec<(Entry, f32)>>,
    /// Answers per prompt (the rendered messages).
    answers: HashMap<String, String>,
    embed_ms: Vec<f64>,
}

impl Device<'_> {
    fn answer(&mut self, question: &str, recall: Option<(RecallForm, f32)>) -> anyhow::Result<String> {
        let base = vec![ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", question)];
        let (messages, prefix) = match recall {
            None => (base, None),
            Some((form, threshold)) => {
                if !self.hits.contains_key(question) {
                    let t = Instant::now();
                    let hits = self.memory.search(question, self.top_k, 0.0)?.into_iter().map(|(e, s)| (e.clone(), s)).collect();
                    self.embed_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    self.hits.insert(question.to_string(), hits);
                }
                let chosen: Vec<&Entry> = self.hits[question].iter().filter(|(_, s)| *s >= threshold).map(|(e, _)| e).collect();
                let prompt = with_recalled(&base, &chosen, form, self.budget, self.tokenizer)?;
                (prompt.messages, prompt.reply_prefix)
            }
        };
        let prefix = prefix.unwrap_or_default();
        let key = serde_json::to_string(&(messages.iter().map(|m| (&m.role, &m.content)).collect::<Vec<_>>(), &prefix))?;
        if let Some(a) = self.answers.get(&key) {
            return Ok(a.clone());
        }
        let reply = self.evaluator.answer_from(&messages, &prefix)?;
        self.answers.insert(key, reply.clone());
        Ok(reply)
    }
}

/// The three rates of one configuration on one split.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Rates {
    taught: f64,
    rephrased: f64,
    locality: f64,
}

fn rates(
    device: &mut Device,
    taught: &[(String, String)],
    rephrase: &dyn Fn(usize, &str) -> Option<String>,
    locality: &[(String, String)],
    recall: Option<(RecallForm, f32)>,
) -> anyhow::Result<Rates> {
    let share = |n: usize, of: usize| n as f64 / of.max(1) as f64;
    let (mut asked, mut rephrased, mut rephrasings, mut kept) = (0, 0, 0, 0);
    for (i, (q, a)) in taught.iter().enumerate() {
        asked += usize::from(as_taught(&device.answer(q, recall)?, a));
        if let Some(other) = rephrase(i, q) {
            rephrasings += 1;
            rephrased += usize::from(as_taught(&device.answer(&other, recall)?, a));
        }
    }
    for (q, baseline) in locality {
        kept += usize::from(normalise(&device.answer(q, recall)?) == normalise(baseline));
    }
    Ok(Rates { taught: share(asked, taught.len()), rephrased: share(rephrased, rephrasings), locality: share(kept, locality.len()) })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(args.get(1).map_or("target/recall-eval", String::as_str));
    let test_n: usize = args.get(2).map_or(40, |s| s.parse().expect("TEST is a number"));
    let tune_n: usize = args.get(3).map_or(20, |s| s.parse().expect("TUNE is a number"));
    let started = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("NOCTURNE_PYTHON").unwrap_or_else(|_| "python3".into());
    let pairs = chatterbot_pairs(&CHATTERBOT.fetch(&repo.join("models/cache/downloads"), &python)?)?;
    let general: Vec<String> = include_str!("../../data/general_questions.txt").lines().map(String::from).collect();
    let pack_dir = repo.join("models/cache/smollm2-135m-instruct/int8");
    let pack = ModelPack::open(&pack_dir)?;
    let tokenizer = Tokenizer::from_file(&pack_dir.join(TOKENIZER_FILE))?;
    let profile = device_profile(None)?;
    let _ = std::fs::remove_dir_all(&out);

    // 1. Ask, correct the wrong ones through the journal.
    let state = StateDir::new(out.join("device"));
    let device_id = state.device_id_or_create()?;
    let mut journal = Journal::open(&state.journal_dir(), device_id, JournalConfig::for_profile(&profile))?;
    let mut evaluator = Evaluator::new(&pack, &tokenizer, &profile)?;
    let (mut corrected, mut uncorrected) = (Vec::new(), Vec::new());
    for (q, a) in &pairs {
        let reply = evaluator.answer(&example(vec![ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", q)]))?;
        if corrected.len() < tune_n + test_n && !as_taught(&reply, a) {
            let interaction = Interaction::of_texts(corrected.len() as u64, pack.id(), DEFAULT_SYSTEM_PROMPT, q, &reply);
            let lsn = journal.append(&Body::Interaction(interaction))?;
            journal.append_durable(&Body::Feedback(Feedback { interaction: lsn, correction: Some(Cow::Borrowed(a)), ..Feedback::default() }))?;
            corrected.push((q.clone(), a.clone()));
        } else {
            uncorrected.push((q.clone(), reply));
        }
        if corrected.len() == tune_n + test_n && uncorrected.len() >= 150 {
            break;
        }
    }
    journal.close()?;
    for q in &general {
        let reply = evaluator.answer(&example(vec![ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", q)]))?;
        uncorrected.push((q.clone(), reply));
    }
    let (tune, test) = corrected.split_at(tune_n);
    let (locality_tune, locality_report): (Vec<_>, Vec<_>) = uncorrected.iter().cloned().enumerate().partition(|(i, _)| i % 2 == 0);
    let strip = |v: Vec<(usize, (String, String))>| v.into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    let (locality_tune, locality_report) = (strip(locality_tune), strip(locality_report));
    println!(
        "{} corrections taught ({} tuning, {} test); {} never-taught questions ({} tuning, {} report); {:.0} s",
        corrected.len(),
        tune.len(),
        test.len(),
        uncorrected.len(),
        locality_tune.len(),
        locality_report.len(),
        started.elapsed().as_secs_f64()
    );

    let encoder = SentenceEncoder::load(&repo.join("models/cache/all-minilm-l6-v2"), profile.recall.max_sequence_tokens as usize)?;
    let (memory, report) = RecallMemory::open(&state, encoder, &profile.recall)?;
    println!("recall memory opened: {} taught answers from the journal", report.added);
    let mut device = Device {
        evaluator,
        tokenizer: &tokenizer,
        memory,
        top_k: profile.recall.top_k as usize,
        budget: profile.recall.prompt_tokens as usize,
        hits: HashMap::new(),
        answers: HashMap::new(),
        embed_ms: Vec::new(),
    };

    // 2. Tuning split only.
    let mut grid = Vec::new();
    for form in [RecallForm::Prefill, RecallForm::Turns, RecallForm::System] {
        for threshold in [0.6f32, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9] {
            let r = rates(&mut device, tune, &|i, q| Some(tune_rephrase(i, q)), &locality_tune, Some((form, threshold)))?;
            println!("tune {form:?} threshold {threshold:.2}: taught {:.3}, rephrased {:.3}, locality {:.3}", r.taught, r.rephrased, r.locality);
            grid.push((form, threshold, r));
        }
    }
    let (form, threshold, _) = grid
        .iter()
        .filter(|(_, _, r)| r.locality >= 0.95)
        // Ties go to the higher threshold: the same effect, less chance of recalling something unrelated.
        .max_by(|a, b| (a.2.taught + a.2.rephrased).total_cmp(&(b.2.taught + b.2.rephrased)).then(a.1.total_cmp(&b.1)))
        .copied()
        .unwrap_or((RecallForm::Turns, 0.85, Rates::default()));
    println!("chosen on the tuning split: {form:?}, threshold {threshold:.2}");

    // 3. Report split.
    let off = rates(&mut device, test, &|i, q| Some(report_rephrase(i, q)), &locality_report, None)?;
    let on = rates(&mut device, test, &|i, q| Some(report_rephrase(i, q)), &locality_report, Some((form, threshold)))?;
    let paraphrases: HashMap<&str, &str> = include_str!("paraphrases.txt").lines().filter_map(|l| l.split_once('\t')).collect();
    let by_hand = |_: usize, q: &str| paraphrases.get(q).map(|p| p.to_string());
    let written = test.iter().filter(|(q, _)| paraphrases.contains_key(q.as_str())).count();
    let hand_off = rates(&mut device, test, &by_hand, &[], None)?.rephrased;
    let hand_on = rates(&mut device, test, &by_hand, &[], Some((form, threshold)))?.rephrased;
    println!(
        "\n| recall | answered as taught ({} corrections) | rephrased (report templates) | rephrased by hand ({written} of {}) | locality ({} never-taught questions) |",
        test.len(),
        test.len(),
        locality_report.len()
    );
    println!("|---|---|---|---|---|");
    for (name, r, hand) in [("off", off, hand_off), ("on", on, hand_on)] {
        println!("| {name} | {:.1}% | {:.1}% | {:.1}% | {:.1}% |", 100.0 * r.taught, 100.0 * r.rephrased, 100.0 * hand, 100.0 * r.locality);
    }
    let mut embed = device.embed_ms.clone();
    embed.sort_by(f64::total_cmp);
    let median = embed.get(embed.len() / 2).copied().unwrap_or(0.0);
    println!("\nsearch (embedding + exact top-{}) per question: median {median:.2} ms over {} questions; {:.0} s in all", device.top_k, embed.len(), started.elapsed().as_secs_f64());
    let json = serde_json::json!({
        "tune": {"corrections": tune.len(), "locality": locality_tune.len(), "grid": grid.iter().map(|(f, t, r)| serde_json::json!({"form": format!("{f:?}"), "threshold": t, "rates": r})).collect::<Vec<_>>()},
        "chosen": {"form": format!("{form:?}"), "threshold": threshold},
        "report": {"corrections": test.len(), "locality": locality_report.len(), "off": off, "on": on,
                   "paraphrased_by_hand": {"questions": written, "off": hand_off, "on": hand_on}},
        "search_ms_median": median,
    });
    std::fs::write(out.join("recall.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
