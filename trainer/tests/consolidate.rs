//! Consolidation on the real SmolLM2 pack: every acknowledged correction
//! reaches the training set, training lowers the loss on a taught
//! correction, the export loads on the device and in the PEFT layout, and
//! the gate decides as documented.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device};
use nocturne::adapter::LoraAdapter;
use nocturne::journal::{Body, Feedback, Interaction, Journal, JournalConfig};
use nocturne::ids::{DeviceId, ModelId};
use nocturne::profile::Durability;
use nocturne::journal::StopReason;
use nocturne::tokenizer::Tokenizer;
use nocturne::weights::ModelPack;
use nocturne_trainer::train::{batches, rehearsal_samples, tokenize, train, Retention, TrainConfig};
use nocturne_trainer::eval::{normalise, Gate, Scores};
use nocturne_trainer::export::{export_adapter, AdapterPrecision};
use nocturne_trainer::llama::{sequence_loss, BaseModel, Lora};
use nocturne_trainer::replay::{PriorityWeights, ReplayBuffer};
use nocturne_trainer::consolidate::{consolidate, retention_texts, NightConfig, NightSources};
use nocturne_trainer::eval::device_profile;
use nocturne_trainer::paraphrase::ParaphraseConfig;

fn pack_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cache/smollm2-135m-instruct/int8");
    assert!(dir.is_dir(), "{} is missing: run `models/fetch` first", dir.display());
    dir
}

/// The devices' recall encoder, which scopes an adapter.
fn encoder_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cache/all-minilm-l6-v2");
    assert!(dir.is_dir(), "{} is missing: run `models/fetch` first", dir.display());
    dir
}

/// A journal with one interaction whose reply the user corrected.
fn corrected_journal(dir: &Path, base: ModelId) {
    correction_journal(dir, base, DeviceId([2; 16]), "What is the name of this kiosk?", "This is the Harbour Station kiosk.");
}

/// A journal of `device` with one interaction, `question` answered
/// generically, and the user's correction `answer`.
fn correction_journal(dir: &Path, base: ModelId, device: DeviceId, question: &str, answer: &str) {
    let config = JournalConfig { durability: Durability::GroupCommit, group_commit: Duration::from_millis(1), segment_bytes: 1 << 20, disk_quota_bytes: 1 << 30 };
    let mut journal = Journal::open(dir, device, config).unwrap();
    let interaction = Interaction {
        conversation: 1,
        turn: 0,
        base_model: base,
        adapter: None,
        system: Cow::Borrowed("You are a kiosk assistant."),
        prompt: Cow::Borrowed(question),
        reply: Cow::Borrowed("I am an AI assistant."),
        prompt_tokens: 30,
        reused_tokens: 0,
        new_tokens: 6,
        stop_reason: StopReason::Eos,
        prefill_tokens_per_s: 1.0,
        decode_tokens_per_s: 1.0,
        time_to_first_token_ms: 1.0,
        peak_memory_bytes: 1,
        persona: None,
        recalled: Cow::Borrowed(&[]),
    };
    let lsn = journal.append(&Body::Interaction(interaction)).unwrap();
    let fix = Feedback { interaction: lsn, correction: Some(Cow::Borrowed(answer)), ..Feedback::default() };
    journal.append(&Body::Feedback(fix)).unwrap();
    journal.close().unwrap();
}

#[test]
fn training_learns_a_correction_and_the_export_loads_everywhere() {
    let dir = pack_dir();
    let pack = ModelPack::open(&dir).unwrap();
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    corrected_journal(&tmp.path().join("journal"), pack.id());
    let buffer = ReplayBuffer::build(&[tmp.path().join("journal")], PriorityWeights::default()).unwrap();
    assert_eq!(buffer.examples.len(), 1);
    let base = BaseModel::from_pack(&pack, DType::F32, &Device::Cpu, 128).unwrap();
    let config = TrainConfig { steps: 12, learning_rate: 5e-3, mas_lambda: 0.5, ..TrainConfig::default() };
    let reference = vec![tokenizer.encode("The weather today is mild and sunny.").unwrap()];
    let rehearsal = rehearsal_samples(&pack, None, &tokenizer, 2, 16, 7).unwrap();
    // Free text from a document boundary, then a chat exchange (system
    // prompt, the model's question and its reply) that may end before the length.
    assert_eq!((rehearsal[0].len(), rehearsal[0][0]), (16, 0));
    assert!(rehearsal[1].len() <= 16 && rehearsal[1][0] == tokenizer.special_id(nocturne::tokenizer::IM_START).unwrap(), "{:?}", rehearsal[1]);
    let assistant = tokenizer.encode("assistant\n").unwrap();
    assert!(rehearsal[1].windows(assistant.len()).any(|w| w == assistant), "a reply follows the question: {:?}", rehearsal[1]);
    let outcome = train(&base, &tokenizer, &buffer.subset(&[0]), None, Retention { reference: &reference, rehearsal: &rehearsal }, &config, &mut |_, _, _| {}).unwrap();
    let (first, last) = (outcome.losses[0], *outcome.losses.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    // Rehearsal: the first step sees the base itself (B = 0), so no
    // divergence; training then moves the adapted model away from it.
    assert_eq!(outcome.divergences.len(), 12);
    assert!(outcome.divergences[0].abs() < 1e-5, "{:?}", outcome.divergences);
    assert!(outcome.divergences[11] > 0.0 && outcome.divergences.iter().all(|d| d.is_finite()), "{:?}", outcome.divergences);
    assert!(outcome.tokens_per_second > 0.0);
    // Export: the device bundle opens for this pack, the PEFT copy has its files.
    let key = nocturne::signing::generate().unwrap();
    let exported = export_adapter(&tmp.path().join("out"), &key, &outcome.lora, &pack, None, "{}", AdapterPrecision::F16).unwrap();
    let adapter = LoraAdapter::open(&exported.bundle, &pack, &key.verifying_key()).unwrap();
    assert_eq!((adapter.id(), adapter.rank()), (exported.id, 8));
    // A second night from this adapter rehearses against it, not the bare
    // base: its first step sees no divergence either.
    let warm = Lora::from_adapter(&base, &adapter).unwrap();
    let config = TrainConfig { steps: 2, ..config };
    let again = train(&base, &tokenizer, &buffer.subset(&[0]), Some(warm), Retention { reference: &reference, rehearsal: &rehearsal }, &config, &mut |_, _, _| {}).unwrap();
    assert!(again.divergences[0].abs() < 1e-5, "{:?}", again.divergences);
    // Two examples a step: the first step's task loss (B = 0, the base) is
    // the mean of its two examples' losses.
    let reworded = buffer.examples[0].reworded("Tell me: what is the capital of the kingdom?", 1.0);
    let pair = ReplayBuffer { examples: vec![buffer.examples[0].clone(), reworded], untaught: Vec::new(), report: buffer.report.clone() };
    let config = TrainConfig { steps: 1, examples_per_step: 2, mas_lambda: 0.0, rehearsal_weight: 0.0, ..config };
    let batch = &batches(&pair, &config)[0];
    let base_loss = |i: usize| {
        let (ids, labels) = tokenize(&tokenizer, &pair.examples[i], config.max_tokens).unwrap();
        sequence_loss(&base, &ids, &labels, None).unwrap().to_scalar::<f32>().unwrap()
    };
    let want = (base_loss(batch[0]) + base_loss(batch[1])) / 2.0;
    let paired = train(&base, &tokenizer, &pair, None, Retention { reference: &reference, rehearsal: &[] }, &config, &mut |_, _, _| {}).unwrap();
    assert_eq!(batch.len(), 2);
    assert!((paired.losses[0] - want).abs() < 1e-4, "{} vs {want}", paired.losses[0]);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exported.peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(8)));
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj"]));
    // PEFT loads the base named here: the upstream model the manifest gives.
    assert_eq!(config["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    let bytes = std::fs::read(exported.peft.join("adapter_model.safetensors")).unwrap();
    let peft = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a = peft.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
    assert_eq!(a.shape(), [8, 576]);
    assert_eq!(peft.len(), 30 * 4 * 2);
}

#[test]
fn the_gate_publishes_only_improvements_within_the_retention_and_locality_bounds() {
    let gate = Gate::default();
    let s = |efficacy, generalisation, locality, retention_perplexity| Scores { efficacy, generalisation, locality, retention_perplexity };
    assert!(gate.decide(&s(0.1, None, 1.0, 10.0), &s(0.8, None, 0.96, 10.2)).0);
    assert!(!gate.decide(&s(0.1, None, 1.0, 10.0), &s(0.8, None, 1.0, 10.4)).0, "retention rose 4%");
    assert!(!gate.decide(&s(0.5, None, 1.0, 10.0), &s(0.5, None, 1.0, 9.0)).0, "no improvement");
    assert!(!gate.decide(&s(0.1, Some(0.5), 1.0, 10.0), &s(0.8, Some(0.4), 1.0, 10.0)).0, "generalisation fell");
    let (published, why) = gate.decide(&s(0.1, Some(0.5), 1.0, 10.0), &s(0.8, Some(0.6), 0.9, 9.9));
    assert!(!published && why.contains("locality 0.900"), "{why}");
    assert_eq!(normalise("  Paris. "), normalise("paris"));
    assert_ne!(normalise("Paris"), normalise("Lyon"));
}

#[test]
fn consolidate_eval_and_report_from_the_command_line() {
    let dir = pack_dir();
    let pack = ModelPack::open(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    corrected_journal(&tmp.path().join("journal"), pack.id());
    let trainer = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nocturne-trainer")).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{args:?}: {}{text}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let store = tmp.path().join("store");
    trainer(&["keygen", "--store", store.to_str().unwrap()]);
    let out_dir = tmp.path().join("night");
    let (journal, base, out) = (tmp.path().join("journal"), dir.to_str().unwrap().to_string(), out_dir.to_str().unwrap().to_string());
    let key = store.join("trainer.key");
    let text = trainer(&[
        "consolidate", "--store", store.to_str().unwrap(), "--journal", journal.to_str().unwrap(), "--key", key.to_str().unwrap(), "--base", &base, "--out", &out, "--steps", "3",
        "--rehearsal-sequences", "2", "--precision", "int8", "--encoder", encoder_dir().to_str().unwrap(), "--general-questions", "10",
    ]);
    assert!(text.contains("1 examples (1 corrections") && text.contains("retention perplexity"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["losses"].as_array().unwrap().len(), 3);
    assert_eq!(report["divergences"].as_array().unwrap().len(), 3);
    assert_eq!(report["precision"], "int8");
    let bundle = report["bundle"].as_str().unwrap();
    assert!(Path::new(bundle).join("adapter.safetensors").exists());
    // The manifest carries the evaluation and the gate's decision.
    let manifest: nocturne::adapter::AdapterManifest = nocturne::signing::peek_sealed(&std::fs::read(Path::new(bundle).join("MANIFEST")).unwrap()).unwrap();
    let description: serde_json::Value = serde_json::from_str(&manifest.description).unwrap();
    assert_eq!(description["after"], report["after"]);
    assert_eq!(description["published"], report["published"]);
    // It lists the corrections the candidate answers as taught: as many as the after-score says.
    let learned = description["learned"].as_array().unwrap();
    assert_eq!(learned.len() as f64, report["after"]["efficacy"].as_f64().unwrap(), "one correction taught: {description}");
    // The night wrote paraphrases of the corrected question (trained on, and
    // one for the gate when it found two), trained on the correction itself
    // and every trained paraphrase, and measured locality on the built-in
    // general questions asked for, split in two.
    let written = report["paraphrases"].as_array().unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["question"], "What is the name of this kiosk?");
    let trained = written[0]["trained"].as_array().unwrap().len() as u64;
    // And two framings of it (the default), which no filter drops.
    let framed = written[0]["framings"].as_array().unwrap();
    assert_eq!(framed.len(), ParaphraseConfig::default().framings, "{framed:?}");
    assert!(framed.iter().all(|f| f.as_str().unwrap().to_lowercase().contains("what is the name of this kiosk")), "{framed:?}");
    assert_eq!(description["trained_on"].as_u64(), Some(1 + trained + framed.len() as u64), "{description}");
    // Given the encoder, every paraphrase kept (trained on or the gate's) is
    // close to the question in its embedding.
    let encoder = nocturne::recall::encoder::SentenceEncoder::load(&encoder_dir(), 128).unwrap();
    let question = encoder.embed("What is the name of this kiosk?").unwrap();
    let mut kept: Vec<&str> = written[0]["trained"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    kept.extend(written[0]["gate"].as_str());
    // The store keeps them for the next nights, in the order found.
    let cache = nocturne_trainer::paraphrase::ParaphraseCache::open(&store.join(nocturne_trainer::store::PARAPHRASE_CACHE)).unwrap();
    let interaction = 1; // the journal's first record
    assert_eq!(cache.get(DeviceId([2; 16]), interaction, "What is the name of this kiosk?", 4), Some(kept.iter().map(|p| p.to_string()).collect()));
    for paraphrase in kept {
        let embedding = encoder.embed(paraphrase).unwrap();
        let similarity: f32 = embedding.iter().zip(&question).map(|(a, b)| a * b).sum();
        assert!(similarity >= ParaphraseConfig::default().min_similarity, "{paraphrase}: similarity {similarity}");
    }
    assert_eq!(report["locality_probes"], serde_json::json!([5, 5]));
    for entry in learned {
        let device = nocturne::ids::DeviceId::from_hex(entry["device"].as_str().unwrap()).unwrap();
        assert_eq!(manifest.learned(device), [entry["interaction"].as_u64().unwrap()]);
    }
    let html = tmp.path().join("report.html");
    trainer(&["report", "--from", out_dir.join("report.json").to_str().unwrap(), "--out", html.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&html).unwrap().matches("<svg").count(), 6);
    let trainer_pub = store.join("trainer.pub");
    let text = trainer(&["eval", "--journal", journal.to_str().unwrap(), "--base", &base, "--adapter", bundle, "--trainer-pub", trainer_pub.to_str().unwrap()]);
    assert!(text.contains("on 1 corrections; retention perplexity"), "{text}");
}

/// Every correction a device acknowledged (its feedback record durable), in
/// whatever segment it landed, reaches the night's training examples through
/// sync, none held back; the interactions nobody rated become locality probes.
#[test]
fn every_acknowledged_correction_reaches_the_training_set() {
    let tmp = tempfile::tempdir().unwrap();
    let state = nocturne::device::StateDir::new(tmp.path().join("device"));
    let device = state.device_id_or_create().unwrap();
    // Small segments, so the corrections spread over many of them.
    let config = JournalConfig { durability: Durability::GroupCommit, group_commit: Duration::from_millis(1), segment_bytes: 2048, disk_quota_bytes: 1 << 30 };
    let mut journal = Journal::open(&state.journal_dir(), device, config).unwrap();
    let (mut acknowledged, mut unrated) = (Vec::new(), Vec::new());
    for i in 0..60u64 {
        let (question, reply, answer) = (format!("Question {i}?"), format!("Reply {i}."), format!("Answer {i}."));
        let lsn = journal.append(&Body::Interaction(Interaction::of_texts(i, ModelId([1; 32]), "Be brief.", &question, &reply))).unwrap();
        if i % 3 == 2 {
            unrated.push(question);
            continue;
        }
        let fix = Feedback { interaction: lsn, correction: Some(Cow::Borrowed(&answer)), ..Feedback::default() };
        journal.append_durable(&Body::Feedback(fix)).unwrap();
        acknowledged.push((lsn, answer));
    }
    assert!(nocturne::journal::reader::list_segments(&state.journal_dir()).unwrap().len() > 3);
    let store = nocturne_trainer::store::Store::new(tmp.path().join("store"));
    store.keygen().unwrap();
    store.enroll(&tmp.path().join("device").join(nocturne::device::DEVICE_PUBLIC_FILE)).unwrap();
    let bundle = nocturne::sync::export(&state, &mut journal, &tmp.path().join("usb")).unwrap().bundle;
    store.ingest(&bundle).unwrap();
    journal.close().unwrap();
    let buffer = ReplayBuffer::build(&[store.device_dir(device)], PriorityWeights::default()).unwrap();
    let trained: Vec<(u64, String)> = buffer.examples.iter().filter(|e| e.corrected).map(|e| (e.interaction, e.target.clone())).collect();
    assert_eq!(trained, acknowledged);
    let probes: Vec<&str> = buffer.untaught.iter().map(|m| m.last().unwrap().content.as_str()).collect();
    assert_eq!(probes, unrated);
}

/// Base swap: a store taught on the int8 pack, consolidated again onto the
/// fp16 pack (`consolidate --base NEW_PACK`, no previous adapter: the whole
/// history in the store), gives an adapter bound to the new base, which a
/// device on the fp16 pack installs and a device still on int8 refuses.
#[test]
fn a_store_taught_on_one_base_is_consolidated_onto_another() {
    let int8_dir = pack_dir();
    let fp16_dir = int8_dir.parent().unwrap().join("fp16");
    let (int8, fp16) = (ModelPack::open(&int8_dir).unwrap(), ModelPack::open(&fp16_dir).unwrap());
    assert_ne!(int8.id(), fp16.id());
    let tmp = tempfile::tempdir().unwrap();
    corrected_journal(&tmp.path().join("journal"), int8.id());
    let store = tmp.path().join("store");
    let trainer_pub = nocturne_trainer::store::Store::new(&store).keygen().unwrap();
    let out = tmp.path().join("night");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_nocturne-trainer"))
        .args(["consolidate", "--journal", tmp.path().join("journal").to_str().unwrap(), "--key", store.join("trainer.key").to_str().unwrap()])
        .args(["--base", fp16_dir.to_str().unwrap(), "--out", out.to_str().unwrap(), "--steps", "3", "--rehearsal-sequences", "2", "--paraphrases", "0", "--unscoped", "--general-questions", "0"])
        .status()
        .unwrap();
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let bundle = Path::new(report["bundle"].as_str().unwrap());
    let state = nocturne::device::StateDir::new(tmp.path().join("device"));
    state.device_id_or_create().unwrap();
    state.trust_trainer(&trainer_pub).unwrap();
    let allow = nocturne::device::adapters::Unpublished::Allow;
    let installed = nocturne::device::adapters::install(&state, &fp16, bundle, None, allow).unwrap();
    assert!(matches!(installed, nocturne::device::adapters::InstallOutcome::Installed { .. }), "{installed:?}");
    let refused = nocturne::device::adapters::install(&state, &int8, bundle, None, allow);
    assert!(matches!(refused, Err(nocturne::device::adapters::AdapterError::Rejected { .. })), "{refused:?}");
}

/// Two nights, scoped: each learns its corrections, the second keeps the
/// first's, and neither changes the answers to questions nobody taught.
#[test]
fn a_second_night_learns_new_corrections_and_keeps_the_first_nights() {
    let dir = pack_dir();
    let pack = ModelPack::open(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (day1, day2) = (tmp.path().join("day1"), tmp.path().join("day2"));
    corrected_journal(&day1, pack.id());
    correction_journal(&day2, pack.id(), DeviceId([3; 16]), "Where can I charge my phone?", "At the blue pillar next to the ticket machines.");
    let key = nocturne::signing::generate().unwrap();
    let retention = retention_texts(&[]).unwrap();
    let encoder = encoder_dir();
    let config = NightConfig {
        // One example a step and short rehearsal sequences: a step costs its
        // tokens (here 2.1 s a step against 4.5 s with two examples and
        // 80-token rehearsal), and what is tested is that nights accumulate.
        train: TrainConfig { steps: 40, learning_rate: 5e-3, examples_per_step: 1, rehearsal_sequences: 2, rehearsal_tokens: 24, ..TrainConfig::default() },
        weights: PriorityWeights::default(),
        gate: Gate::default(),
        precision: AdapterPrecision::F16,
        device: device_profile(None).unwrap(),
        paraphrase: ParaphraseConfig { wanted: 0, ..ParaphraseConfig::default() },
        general_questions: 20,
    };
    let night = |journals: &[std::path::PathBuf], previous: Option<&Path>, out: &str| {
        let sources = NightSources { journals, base: &dir, previous, key: &key, retention: &retention, encoder: Some(&encoder), paraphrase_cache: None };
        consolidate(sources, &tmp.path().join(out), &config, &mut |_, _, _| {}).unwrap()
    };
    let first = night(std::slice::from_ref(&day1), None, "night1");
    assert_eq!((first.before.efficacy, first.after.efficacy), (0.0, 1.0), "{}", first.decision);
    // Night 2 reads the whole history from night 1's adapter: before it,
    // the first correction is answered and the new one is not; after it, both.
    let second = night(&[day1, day2], Some(&first.bundle), "night2");
    assert_eq!((second.before.efficacy, second.after.efficacy), (0.5, 1.0), "{}", second.decision);
    let adapter = LoraAdapter::open(&second.bundle, &pack, &key.verifying_key()).unwrap();
    assert_eq!(adapter.manifest().parent.map(|p| p.to_string()), Some(first.adapter.clone()));
    // Scoped: the untaught questions are answered as before each night.
    assert!(adapter.manifest().scoped());
    for night in [&first, &second] {
        assert!(night.after.locality >= 0.95 && night.locality_report >= 0.95, "{} / {}: {:?}", night.after.locality, night.locality_report, night.locality_changes);
    }
}
