//! The learning loop on real data over two days and nights, scripted
//! (`scripts/scenario`):
//!
//! 1. A day: question/answer pairs of `chatterbot-corpus==1.3.3` (English,
//!    all categories) are asked on the device (greedy, the default system
//!    prompt, the device's active adapter); the first QUESTIONS it answers
//!    differently from the corpus are corrected by a simulated user through
//!    the device's feedback path (interaction + correction records in its
//!    journal), and the next questions ([`UNTAUGHT`] on the first day, a
//!    third of that on the second) are asked and left unrated, as a
//!    device's users ask questions nobody corrects (the night's locality
//!    probes of the device's own domain).
//! 2. The journal goes through sync (export, ingest into a host store, the
//!    acknowledgement back).
//! 3. The night runs in VARIANTS variants: with the night's paraphrases (the
//!    defaults), without them (`--paraphrases 0`), and with neither
//!    paraphrases nor the anti-forgetting terms (MAS penalty, rehearsal).
//!    The first night starts from the bare base; the second night of each
//!    variant continues from that variant's first adapter (`--previous`)
//!    on the whole store, so it must keep what the first taught.
//! 4. The first variant's adapter is installed on the device (verify,
//!    self-test, switch): as published, or, when the gate refused it, by the
//!    operator's explicit choice (`Unpublished::Allow`); the next day is
//!    answered with it, applied as the device applies a scoped adapter
//!    (`nocturne::recall::scope`: only to questions whose closest taught
//!    question is one it learned).
//! 5. After NIGHTS such days and nights, each day's corrections are asked
//!    with no adapter and with every adapter (in its scope, given every
//!    day's corrections as the device's taught questions): as asked (efficacy; every
//!    correction was trained on), and rephrased by two fixed templates and
//!    by hand (`../recall_eval/paraphrases.txt`, where it has the question),
//!    none of which the night's paraphrase generator writes
//!    (generalisation; the templates put the question in other
//!    surroundings, as the night's own framings do, with words none of
//!    `nocturne_trainer::paraphrase::FRAMINGS` uses); locality is the night's own report-part figure
//!    (never-taught questions whose answer stayed the same; the gate uses
//!    the other part), and retention perplexity is measured on held-out
//!    `chitchat-dataset==0.9.0` dialogues. The noise floor of the locality
//!    measure is given beside it: the share of the last night's report
//!    probes the fp16 pack of the same model answers as the int8 pack does,
//!    a change of weights far smaller than any night's (perplexity within 1%).
//! 6. Recall after the last night: the device's recall memory (the encoder
//!    of `models/all-minilm-l6-v2`) follows the installed adapter; the
//!    corrections its manifest lists as learned must no longer be injected,
//!    and every correction is asked again as the device answers it (adapter
//!    and recall together).
//!
//! `cargo run --release -p nocturne-trainer --example scenario -- [OUT] [QUESTIONS] [STEPS] [VARIANTS] [NIGHTS] [REHEARSAL] [--targets T,..] [--paraphrases N]`
//! (defaults `target/scenario`, 40, then consolidate's steps, 2, 2, then its
//! rehearsal weight, targets and paraphrases; `--help` says each). Writes OUT/scenario.json and prints a table.

mod datasets;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nocturne::adapter::LoraAdapter;
use nocturne::device::recall::RecallMemory;
use nocturne::device::{StateDir, DEVICE_PUBLIC_FILE};
use nocturne::recall::encoder::SentenceEncoder;
use nocturne::recall::index::Origin;
use nocturne::journal::{Body, Feedback, Interaction, Journal, JournalConfig};
use nocturne::device::adapters::{install, Unpublished};
use nocturne::sync::{export, import_acks};
use nocturne::tokenizer::{ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT};
use nocturne::weights::{ModelPack, TOKENIZER_FILE};
use nocturne_trainer::train::TrainConfig;
use datasets::{chatterbot_pairs, chitchat_dialogues, CHATTERBOT, CHITCHAT};
use nocturne_trainer::eval::{device_profile, normalise, unchanged_share, AdapterScope, Evaluator, Gate};
use nocturne_trainer::consolidate::{self, consolidate, locality_probes, retention_texts, NightConfig, NightSources};
use nocturne_trainer::paraphrase::{lower_first, ParaphraseConfig};
use nocturne_trainer::replay::{Example, PriorityWeights, ReplayBuffer};
use nocturne_trainer::store::{Store, PARAPHRASE_CACHE};

fn example(question: &str, answer: &str) -> Example {
    Example {
        device: Default::default(),
        interaction: 0,
        time_ms: 0,
        messages: vec![ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", question)],
        target: answer.to_string(),
        reply: String::new(),
        corrected: true,
        implicit: 0.0,
        explicit: 1.0,
        priority: 1.0,
    }
}

/// The devices' recall encoder, under the repository (what `models/fetch` writes).
const ENCODER: &str = "models/cache/all-minilm-l6-v2";

/// Uncorrected questions asked after the corrected ones and left unrated.
const UNTAUGHT: usize = 150;

/// A rephrasing that keeps the question's meaning (two fixed templates, alternating).
fn rephrase(i: usize, question: &str) -> String {
    let lowered = lower_first(question);
    if i.is_multiple_of(2) {
        format!("Quick question: {lowered}")
    } else {
        format!("{question} Please answer briefly.")
    }
}

/// Answered as taught: exact, normalised, or containing the taught answer
/// (issue 13's measure, as `recall_eval` uses it).
fn as_taught(reply: &str, taught: &str) -> bool {
    let (r, t) = (normalise(reply), normalise(taught));
    reply == taught || r == t || (!t.is_empty() && r.contains(&t))
}


/// Step 6's figures.
#[derive(serde::Serialize)]
struct AfterNight {
    /// Trained corrections the active adapter's manifest lists as learned.
    learned: usize,
    /// Of those, how many recall still put into the prompt (should be 0).
    learned_injected: usize,
    /// Trained set answered as taught by the device (adapter + recall).
    taught_rate: f64,
    /// Learned ones answered as taught (the adapter alone answers them).
    learned_rate: f64,
}

/// Opens the device's recall memory as `generate` does, follows the active
/// adapter, and asks the trained set through it.
fn recall_after_night(
    repo: &Path,
    state: &StateDir,
    profile: &nocturne::profile::Profile,
    evaluator: &mut Evaluator<'_>,
    tokenizer: &Tokenizer,
    trained: &[&(String, String, u64)],
) -> anyhow::Result<AfterNight> {
    let encoder = SentenceEncoder::load(&repo.join(ENCODER), profile.recall.max_sequence_tokens as usize)?;
    let (mut memory, _) = RecallMemory::open(state, encoder, &profile.recall)?;
    evaluator.set_scope(None);
    memory.follow_active_adapter(state)?;
    let learned: Vec<u64> = memory
        .index()
        .entries()
        .iter()
        .filter(|e| e.learned_by.is_some())
        .filter_map(|e| match e.origin {
            Origin::Taught { interaction, .. } => Some(interaction),
            Origin::Passage { .. } => None,
        })
        .collect();
    let (mut taught, mut learned_taught, mut learned_injected) = (0, 0, 0);
    for (q, a, lsn) in trained {
        let messages = [ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", q)];
        let recollection = memory.recall_into(&messages, tokenizer, &profile.recall)?;
        let injected = recollection.used.iter().any(|(e, _)| matches!(e.origin, Origin::Taught { interaction, .. } if interaction == *lsn));
        evaluator.apply_adapter(recollection.adapter_applies);
        let prompt = &recollection.prompt;
        let ok = as_taught(&evaluator.answer_from(&prompt.messages, prompt.reply_prefix.as_deref().unwrap_or(""))?, a);
        taught += usize::from(ok);
        if learned.contains(lsn) {
            learned_injected += usize::from(injected);
            learned_taught += usize::from(ok);
        }
    }
    let share = |n: usize, of: usize| n as f64 / of.max(1) as f64;
    Ok(AfterNight { learned: learned.len(), learned_injected, taught_rate: share(taught, trained.len()), learned_rate: share(learned_taught, learned.len()) })
}

/// The scope `adapter` has on the device once `days` were taught (their
/// corrections the device's taught questions, learned where its manifest
/// lists them); None for an unscoped adapter.
fn device_scope(encoder: &Arc<SentenceEncoder>, profile: &nocturne::profile::Profile, adapter: &LoraAdapter, device: nocturne::ids::DeviceId, days: &[Day]) -> anyhow::Result<Option<AdapterScope>> {
    if !adapter.manifest().scoped() {
        return Ok(None);
    }
    let learned = adapter.manifest().learned(device);
    let taught: Vec<(&str, bool)> = days.iter().flat_map(|d| &d.corrected).map(|(q, _, lsn)| (q.as_str(), learned.contains(lsn))).collect();
    Ok(Some(AdapterScope::new(encoder.clone(), &profile.recall, &taught)?))
}

/// A night's run: its label, its report, its wall time in seconds.
type Night = (String, consolidate::Report, f64);

/// What one day on the device journaled.
struct Day {
    /// Corrected questions: (question, taught answer, interaction LSN).
    corrected: Vec<(String, String, u64)>,
    /// Questions asked and left unrated.
    untaught: usize,
}

/// A day on the device: asks `pairs` from `next` on as the device answers
/// them now (greedy, its active adapter), corrects the first `wanted` it
/// answers differently through the journal, then asks `untaught` more and
/// leaves them unrated.
fn day(pairs: &[(String, String)], next: &mut usize, evaluator: &mut Evaluator<'_>, journal: &mut Journal, pack: &ModelPack, wanted: usize, untaught: usize) -> anyhow::Result<Day> {
    let mut today = Day { corrected: Vec::new(), untaught: 0 };
    while today.untaught < untaught && *next < pairs.len() {
        let (q, a) = &pairs[*next];
        *next += 1;
        let reply = evaluator.answer(&example(q, a))?;
        let interaction = Interaction::of_texts(*next as u64, pack.id(), DEFAULT_SYSTEM_PROMPT, q, &reply);
        if today.corrected.len() == wanted {
            journal.append(&Body::Interaction(interaction))?;
            today.untaught += 1;
            continue;
        }
        if reply == *a || normalise(&reply) == normalise(a) {
            continue;
        }
        let lsn = journal.append(&Body::Interaction(interaction))?;
        journal.append_durable(&Body::Feedback(Feedback { interaction: lsn, correction: Some(Cow::Borrowed(a)), ..Feedback::default() }))?;
        today.corrected.push((q.clone(), a.clone(), lsn));
    }
    Ok(today)
}

/// The corrections of a day asked three ways: as asked, by the two
/// templates, by hand (where `by_hand` has the question).
fn question_sets(corrected: &[(String, String, u64)], by_hand: &std::collections::HashMap<&str, &str>) -> [Vec<Example>; 3] {
    [
        corrected.iter().map(|(q, a, _)| example(q, a)).collect(),
        corrected.iter().enumerate().map(|(i, (q, a, _))| example(&rephrase(i, q), a)).collect(),
        corrected.iter().filter_map(|(q, a, _)| by_hand.get(q.as_str()).map(|p| example(p, a))).collect(),
    ]
}

/// The match rate of every set of `sets`, in order; None for a set with no
/// question (the hand-written paraphrases cover only some days).
fn set_rates(evaluator: &mut Evaluator<'_>, sets: &[[Vec<Example>; 3]]) -> anyhow::Result<Vec<Option<f64>>> {
    let mut rates = Vec::new();
    for set in sets.iter().flatten() {
        rates.push(if set.is_empty() { None } else { Some(evaluator.match_rate(&set.iter().collect::<Vec<_>>())?) });
    }
    Ok(rates)
}

/// The scenario's settings: positional as `scripts/scenario` passes them,
/// then optional flags (the night's defaults where absent).
#[derive(clap::Parser)]
struct Args {
    /// Output directory (emptied first).
    #[arg(default_value = "target/scenario")]
    out: PathBuf,
    /// Corrections a day.
    #[arg(default_value_t = 40)]
    questions: usize,
    /// Optimisation steps a night.
    #[arg(default_value_t = TrainConfig::default().steps)]
    steps: usize,
    /// Night variants (1–3): with paraphrases, without, with neither paraphrases nor anti-forgetting terms.
    #[arg(default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    variants: u8,
    /// Days and nights (1–2).
    #[arg(default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    nights: u8,
    /// Weight of the rehearsal term (consolidate --rehearsal-weight).
    #[arg(default_value_t = TrainConfig::default().rehearsal_weight)]
    rehearsal: f64,
    /// Targeted projections, comma-separated (consolidate --targets).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Paraphrases the night writes per corrected question (consolidate --paraphrases).
    #[arg(long, default_value_t = ParaphraseConfig::default().wanted)]
    paraphrases: usize,
}

fn main() -> anyhow::Result<()> {
    nocturne_trainer::train::single_threaded_ops();
    let args = <Args as clap::Parser>::parse();
    let (out, wanted, steps, rehearsal_weight) = (args.out, args.questions, args.steps, args.rehearsal);
    let (variant_count, night_count) = (usize::from(args.variants), usize::from(args.nights));
    let targets = match args.targets.as_slice() {
        [] => TrainConfig::default().targets,
        names => nocturne_trainer::train::targets_named(names)?,
    };
    let started = Instant::now();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let downloads = repo.join("models/cache/downloads");
    let python = std::env::var("NOCTURNE_PYTHON").unwrap_or_else(|_| "python3".into());
    let pairs = chatterbot_pairs(&CHATTERBOT.fetch(&downloads, &python)?)?;
    let dialogues = chitchat_dialogues(&CHITCHAT.fetch(&downloads, &python)?, 20)?;
    let pack_dir = repo.join("models/cache/smollm2-135m-instruct/int8");
    let pack = ModelPack::open(&pack_dir)?;
    let tokenizer = Tokenizer::from_file(&pack_dir.join(TOKENIZER_FILE))?;
    let _ = std::fs::remove_dir_all(&out);
    println!("{} chatterbot questions (English, all categories); {wanted} corrections a day", pairs.len());

    // The device class the scenario plays: the default firmware profile.
    let profile = device_profile(None)?;
    let state = StateDir::new(out.join("device"));
    let device = state.device_id_or_create()?;
    let mut journal = Journal::open(&state.journal_dir(), device, JournalConfig::for_profile(&profile))?;
    let mut evaluator = Evaluator::new(&pack, &tokenizer, &profile)?;
    let encoder_dir = repo.join(ENCODER);
    let encoder = Arc::new(SentenceEncoder::load(&encoder_dir, profile.recall.max_sequence_tokens as usize)?);
    let store = Store::new(out.join("store"));
    store.keygen()?;
    store.enroll(&out.join("device").join(DEVICE_PUBLIC_FILE))?;
    state.trust_trainer(&out.join("store/trainer.pub"))?;
    let key = nocturne::signing::read_signing_key(&out.join("store/trainer.key"))?;
    let trainer_key = key.verifying_key();
    let dirs = vec![store.device_dir(device)];
    let retention = retention_texts(&[])?;
    let default = TrainConfig { steps, rehearsal_weight, targets, ..TrainConfig::default() };
    let none = ParaphraseConfig { framings: 0, ..ParaphraseConfig::wanting(0) };
    let variants = [
        ("with paraphrases", default.clone(), ParaphraseConfig::wanting(args.paraphrases)),
        ("without paraphrases", default.clone(), none),
        ("no paraphrases, no anti-forgetting term", TrainConfig { mas_lambda: 0.0, rehearsal_weight: 0.0, ..default.clone() }, none),
    ];
    let variants = &variants[..variant_count];

    let (mut days, mut nights): (Vec<Day>, Vec<Vec<Night>>) = (Vec::new(), Vec::new());
    let mut next = 0;
    let mut installed = Vec::new();
    for night in 0..night_count {
        // 1. A day: the device answers, the simulated user corrects through
        // the journal; later questions are left unrated.
        let t = Instant::now();
        let today = day(&pairs, &mut next, &mut evaluator, &mut journal, &pack, wanted, if night == 0 { UNTAUGHT } else { UNTAUGHT / 3 })?;
        println!("day {}: {} corrected, {} left unrated, {next} questions asked so far ({:.0} s)", night + 1, today.corrected.len(), today.untaught, t.elapsed().as_secs_f64());
        days.push(today);
        // 2. Sync to the host, and the acknowledgement back.
        let bundle = export(&state, &mut journal, &out.join(format!("usb-{night}")))?.bundle;
        store.ingest(&bundle)?;
        import_acks(&state, &mut journal, &out.join("store/outbox"))?;
        // 3. The night, in each variant; the second continues each variant's first.
        let mut tonight = Vec::new();
        for (i, (name, train, paraphrase)) in variants.iter().enumerate() {
            let config = NightConfig { train: train.clone(), weights: PriorityWeights::default(), gate: Gate::default(), precision: Default::default(), device: profile.clone(), paraphrase: *paraphrase, general_questions: consolidate::general_question_count() };
            let previous = nights.last().map(|n: &Vec<Night>| n[i].1.bundle.clone());
            let cache = out.join("store").join(PARAPHRASE_CACHE);
            let t = Instant::now();
            let sources = NightSources { journals: &dirs, base: &pack_dir, previous: previous.as_deref(), key: &key, retention: &retention, encoder: Some(&encoder_dir), paraphrase_cache: Some(&cache) };
            let label = format!("night {}, {name}", night + 1);
            let report = consolidate(sources, &out.join(format!("night-{}-{i}", night + 1)), &config, &mut |step, loss, tps| {
                if step % 100 == 0 {
                    println!("  {label}: step {step}, loss {loss:.3}, {tps:.0} tokens/s");
                }
            })?;
            let seconds = t.elapsed().as_secs_f64();
            println!(
                "{label}: {seconds:.0} s, training {:.0} tokens/s; {}: {}",
                report.tokens_per_second,
                if report.published { "published" } else { "not published" },
                report.decision
            );
            tonight.push((label, report, seconds));
        }
        // 4. The first variant's adapter goes to the device: as a device
        // takes it when the gate published it, else by the operator's
        // explicit choice (so that the next day and step 6 run with it; the
        // output says which).
        let (bundle, published) = (&tonight[0].1.bundle, tonight[0].1.published);
        let outcome = install(&state, &pack, bundle, Some(&mut journal), if published { Unpublished::Refuse } else { Unpublished::Allow })?;
        println!("device install ({}): {outcome:?}", if published { "published" } else { "not published: installed by the operator's choice" });
        let adapter = LoraAdapter::open(bundle, &pack, &trainer_key)?;
        let scope = device_scope(&encoder, &profile, &adapter, device, &days)?;
        evaluator.set_adapter(Some(Arc::new(adapter)));
        evaluator.set_scope(scope);
        installed.push((format!("{outcome:?}"), published));
        nights.push(tonight);
    }
    journal.close()?;

    // 5. Ask again, each day's corrections: as asked, rephrased by template, rephrased by hand.
    let by_hand: std::collections::HashMap<&str, &str> = include_str!("../recall_eval/paraphrases.txt").lines().filter_map(|l| l.split_once('\t')).collect();
    let sets: Vec<[Vec<Example>; 3]> = days.iter().map(|d| question_sets(&d.corrected, &by_hand)).collect();
    let models: Vec<(String, Option<Arc<LoraAdapter>>, Option<f64>)> = std::iter::once(("base model, no adapter".to_string(), None, None))
        .chain(nights.iter().flatten().map(|(name, report, _)| {
            (format!("adapter, {name}"), LoraAdapter::open(&report.bundle, &pack, &trainer_key).map(Arc::new).ok(), Some(report.locality_report))
        }))
        .collect();
    let mut header = String::from("| model |");
    for (d, s) in sets.iter().enumerate() {
        header += &format!(" day {} as asked ({}) | templates ({}) | by hand ({}) |", d + 1, s[0].len(), s[1].len(), s[2].len());
    }
    println!("{header} locality (report part) | chitchat perplexity |");
    println!("|---|{}---|---|", "---|---|---|".repeat(sets.len()));
    let (mut rows, mut scope_lines) = (Vec::new(), Vec::new());
    for (name, adapter, locality) in models {
        let scope = adapter.as_deref().map(|a| device_scope(&encoder, &profile, a, device, &days)).transpose()?.flatten();
        // Which questions the device applies the adapter to at all: a
        // rephrasing out of scope is answered by the base model.
        let mut in_scope = Vec::new();
        for set in sets.iter().flatten() {
            let mut applied = 0;
            for e in set {
                let question = e.messages.last().map_or("", |m| m.content.as_str());
                applied += usize::from(scope.as_ref().map_or(Ok(adapter.is_some()), |s| s.applies(question))?);
            }
            in_scope.push((!set.is_empty()).then(|| applied as f64 / set.len() as f64));
        }
        evaluator.set_adapter(adapter);
        evaluator.set_scope(scope);
        let rates = set_rates(&mut evaluator, &sets)?;
        let ppl = evaluator.perplexity(&dialogues)?;
        // The same sets with the adapter on every request: what it learned,
        // whatever the scope.
        let unscoped = if locality.is_some() {
            let saved = evaluator.set_scope(None);
            let rates = set_rates(&mut evaluator, &sets)?;
            evaluator.set_scope(saved);
            rates
        } else {
            Vec::new()
        };
        let percent = |r: Option<f64>| r.map_or("—".to_string(), |r| format!("{:.1}%", 100.0 * r));
        let shown = percent(locality);
        let cells: String = rates.iter().map(|&r| format!(" {} |", percent(r))).collect();
        println!("| {name} |{cells} {shown} | {ppl:.3} |");
        let per_day: Vec<serde_json::Value> = rates.chunks(3).zip(in_scope.chunks(3)).map(|(r, s)| serde_json::json!({"as_asked": r[0], "templates": r[1], "by_hand": r[2], "in_scope": s})).collect();
        if locality.is_some() {
            let shares = |v: &[Option<f64>]| v.iter().map(|&s| percent(s)).collect::<Vec<_>>().join(" | ");
            scope_lines.push(format!("{name}: in scope {}; answered as taught with the adapter on every request {}", shares(&in_scope), shares(&unscoped)));
        }
        rows.push(serde_json::json!({"model": name, "days": per_day, "unscoped": unscoped, "locality": locality, "chitchat_perplexity": ppl}));
    }
    println!("each set (in the table's order) as far as the device applies the adapter (in scope), and with it applied everywhere:");
    for line in &scope_lines {
        println!("  {line}");
    }
    // The locality measure's noise floor: the same model in fp16.
    let probes = locality_probes(&ReplayBuffer::build(&dirs[..], PriorityWeights::default())?.untaught, consolidate::general_question_count()).1;
    let fp16_dir = repo.join("models/cache/smollm2-135m-instruct/fp16");
    let fp16 = ModelPack::open(&fp16_dir)?;
    evaluator.set_adapter(None);
    let int8_answers = evaluator.answers(&probes)?;
    let fp16_answers = Evaluator::new(&fp16, &tokenizer, &profile)?.answers(&probes)?;
    let noise_floor = unchanged_share(&int8_answers, &fp16_answers);
    println!("noise floor of locality: the fp16 pack answers {:.1}% of the {} report probes as the int8 pack does", 100.0 * noise_floor, probes.len());
    // 6. Recall after the last night, on every correction.
    let last = &nights.last().expect("at least one night")[0].1.bundle;
    evaluator.set_adapter(Some(Arc::new(LoraAdapter::open(last, &pack, &trainer_key)?)));
    let corrected: Vec<&(String, String, u64)> = days.iter().flat_map(|d| &d.corrected).collect();
    let after_night = recall_after_night(&repo, &state, &profile, &mut evaluator, &tokenizer, &corrected)?;
    println!(
        "recall after the last night: {} of {} corrections learned by the adapter, {} of them still injected; \
         answered as taught with adapter and recall: {:.1}% (learned ones: {:.1}%)",
        after_night.learned, corrected.len(), after_night.learned_injected, 100.0 * after_night.taught_rate, 100.0 * after_night.learned_rate
    );
    let summary = serde_json::json!({
        "questions_in_corpus": pairs.len(),
        "asked": next,
        "corrected": days.iter().map(|d| d.corrected.len()).collect::<Vec<_>>(),
        "untaught": days.iter().map(|d| d.untaught).collect::<Vec<_>>(),
        "steps": steps,
        "installed": installed,
        "nights": nights.iter().flatten().map(|(name, r, s)| serde_json::json!({
            "name": name, "mas_lambda": r.mas_lambda, "rehearsal_weight": r.rehearsal_weight, "seconds": s,
            "tokens_per_second": r.tokens_per_second, "train_seconds": r.train_seconds, "before": r.before, "after": r.after,
            "locality_report": r.locality_report, "locality_probes": r.locality_probes, "paraphrases": r.paraphrases,
            "published": r.published, "decision": r.decision, "adapter_bytes": r.adapter_bytes, "bundle": r.bundle,
        })).collect::<Vec<_>>(),
        "evaluation": rows,
        "locality_noise_floor": noise_floor,
        "recall_after_night": after_night,
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::write(out.join("scenario.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
    println!("scenario done in {:.0} s; {}", started.elapsed().as_secs_f64(), out.join("scenario.json").display());
    Ok(())
}
