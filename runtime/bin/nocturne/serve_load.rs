//! `nocturne bench --serve`: a load test of the local API on loopback. It
//! starts a child `nocturne serve` with a fresh state directory, runs
//! `--requests` chat completions from `--clients` concurrent clients (a
//! seeded mix: plain, streamed, and streamed then dropped after the first
//! two events; a 429 is retried after its `Retry-After`), then reads the
//! server's `/metrics`, stops it with SIGTERM and reads its journal. It
//! reports requests/s, first-token time (p50/p99, from the client's side of
//! streamed requests), decode tokens/s per request on a slot, the server's
//! peak RSS against its memory plan, and the checks a load test exists for:
//! every completed response journaled exactly once, no slot busy at the end,
//! a clean exit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

/// Questions the clients ask (repeats exercise the prefix cache).
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Write one sentence about the sea.",
    "Who wrote Romeo and Juliet?",
    "What do bees make?",
    "Give me a word that rhymes with cat.",
];

/// Load settings.
pub struct Load {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests in all.
    pub requests: usize,
    /// Slots of the server (`None`: the profile's).
    pub slots: Option<usize>,
    /// New tokens per request at most.
    pub max_tokens: usize,
    /// Seed of the request mix.
    pub seed: u64,
}

/// How one request went.
#[derive(Default)]
struct Outcome {
    completed: bool,
    cancelled: bool,
    retried_429: usize,
    interaction: Option<u64>,
    first_token: Option<Duration>,
    decode_tokens_per_s: Option<f64>,
}

/// xorshift64*: the request mix, reproducible from the seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Sends one request on a fresh connection and returns the stream to read.
fn send(address: &str, body: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(address).context("cannot connect to the server")?;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all((head + body).as_bytes())?;
    Ok(stream)
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One request of `kind` (0 plain, 1 streamed, 2 streamed and dropped).
fn request(address: &str, kind: u64, question: &str, max_tokens: usize) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens, "stream": kind > 0}).to_string();
    loop {
        let started = Instant::now();
        let mut reader = BufReader::new(send(address, &body)?);
        let mut head = String::new();
        while reader.read_line(&mut head)? > 2 && !head.ends_with("\r\n\r\n") {}
        match status_of(&head) {
            429 => {
                outcome.retried_429 += 1;
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            200 => {}
            status => bail!("status {status}: {head}"),
        }
        if kind == 0 {
            let mut text = String::new();
            reader.read_to_string(&mut text)?;
            let reply: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
            outcome.completed = true;
            outcome.interaction = reply["id"].as_str().and_then(|id| id.strip_prefix("chatcmpl-")).and_then(|n| n.parse().ok());
            return Ok(outcome);
        }
        let (mut events, mut first, mut last) = (0usize, None, None);
        let mut line = String::new();
        while reader.read_line(&mut line)? > 0 {
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                if data == "[DONE]" {
                    outcome.completed = true;
                    break;
                }
                let chunk: serde_json::Value = serde_json::from_str(data).with_context(|| format!("not JSON: {data}"))?;
                if chunk["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
                    events += 1;
                    let now = started.elapsed();
                    first.get_or_insert(now);
                    last = Some(now);
                }
                if let Some(lsn) = chunk["interaction"].as_u64() {
                    outcome.interaction = Some(lsn);
                }
                if kind == 2 && events == 2 {
                    outcome.cancelled = true;
                    return Ok(outcome);
                }
            }
            line.clear();
        }
        outcome.first_token = first;
        if let (Some(f), Some(l)) = (first, last) {
            if events > 1 && l > f {
                outcome.decode_tokens_per_s = Some((events - 1) as f64 / (l - f).as_secs_f64());
            }
        }
        return Ok(outcome);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the load and returns the report (a JSON object).
///
/// # Errors
/// The server did not start, a request failed unexpectedly, or reading the journal failed.
pub fn run(load: &Load) -> anyhow::Result<serde_json::Value> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no random bytes: {e}"))?;
    let state = std::env::temp_dir().join(format!("nocturne-load-{}-{:x}", std::process::id(), u64::from_le_bytes(id)));
    let result = run_in(load, &state);
    let _ = std::fs::remove_dir_all(&state);
    result
}

fn run_in(load: &Load, state: &PathBuf) -> anyhow::Result<serde_json::Value> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0", "--queue", &load.clients.to_string(), "--state-dir"])
        .arg(state)
        .args(load.slots.map(|s| ["--slots".to_string(), s.to_string()]).into_iter().flatten())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start nocturne serve")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listen=").nth(1) {
                let _ = found.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let address = address.recv_timeout(Duration::from_secs(60)).context("the server did not say where it listens")?;
    let get = |path: &str| -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(&address)?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    };
    let ready = Instant::now();
    while !get("/health").map(|t| status_of(&t) == 200).unwrap_or(false) {
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the server did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let issued = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(load.requests));
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..load.clients)
            .map(|c| {
                let (issued, outcomes, address) = (&issued, &outcomes, &address);
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut rng = load.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    while issued.fetch_add(1, Ordering::Relaxed) < load.requests {
                        let roll = next(&mut rng) % 10;
                        let kind = match roll {
                            0..=5 => 0,
                            6..=8 => 1,
                            _ => 2,
                        };
                        let question = QUESTIONS[(next(&mut rng) % QUESTIONS.len() as u64) as usize];
                        let outcome = request(address, kind, question, load.max_tokens)?;
                        outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(outcome);
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());

    // A stream its client just dropped ends within a token of the server
    // noticing; a leaked slot stays busy. Wait up to ten seconds for idle.
    let gauge = |metrics: &str, name: &str| -> Option<f64> {
        metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
    };
    let settle = Instant::now();
    let metrics = loop {
        let metrics = get("/metrics")?;
        if gauge(&metrics, "nocturne_slots_busy") == Some(0.0) || settle.elapsed() > Duration::from_secs(10) {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let gauge = |name: &str| gauge(&metrics, name);
    let (busy, plan) = (gauge("nocturne_slots_busy"), gauge("nocturne_memory_plan_bytes"));
    let peak_rss = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()))
        .map(|kb| kb * 1024);
    // SAFETY: kill has no memory preconditions; the pid is our live child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let exit = child.wait()?;

    let mut journaled: HashMap<u64, usize> = HashMap::new();
    nocturne::journal::read_journal(&state.join("journal"), None, &mut |r| {
        if let nocturne::journal::Body::Interaction(_) = r.body {
            *journaled.entry(r.lsn).or_default() += 1;
        }
    })?;
    let completed: Vec<&Outcome> = outcomes.iter().filter(|o| o.completed).collect();
    let mut ids: Vec<u64> = completed.iter().filter_map(|o| o.interaction).collect();
    let with_id = ids.len();
    ids.sort_unstable();
    ids.dedup();
    let completed_journaled_once = with_id == completed.len() && ids.len() == with_id && ids.iter().all(|id| journaled.get(id) == Some(&1));
    let mut ttft: Vec<f64> = outcomes.iter().filter_map(|o| o.first_token.map(|d| d.as_secs_f64())).collect();
    ttft.sort_by(f64::total_cmp);
    let mut decode: Vec<f64> = outcomes.iter().filter_map(|o| o.decode_tokens_per_s).collect();
    decode.sort_by(f64::total_cmp);
    Ok(json!({
        "slots": load.slots,
        "clients": load.clients,
        "requests": outcomes.len(),
        "completed": completed.len(),
        "cancelled": outcomes.iter().filter(|o| o.cancelled).count(),
        "retried_429": outcomes.iter().map(|o| o.retried_429).sum::<usize>(),
        "seconds": elapsed,
        "requests_per_s": outcomes.len() as f64 / elapsed,
        "first_token_p50_ms": percentile(&ttft, 0.5) * 1e3,
        "first_token_p99_ms": percentile(&ttft, 0.99) * 1e3,
        "decode_tokens_per_s_p50": percentile(&decode, 0.5),
        "journal_interactions": journaled.len(),
        "completed_journaled_once": completed_journaled_once,
        "slots_busy_at_end": busy,
        "memory_plan_bytes": plan,
        "peak_rss_bytes": peak_rss,
        "clean_exit": exit.success(),
    }))
}
