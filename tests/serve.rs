//! `nocturne serve` end to end, over real sockets: OpenAI's own Python
//! client (the pinned `openai` package, installed by `scripts/python-openai`)
//! against the server, then the journal holding what it was told; every bad
//! request answered with a 4xx and an OpenAI error object, the next good
//! request still answered; a client leaving mid-stream frees the slot and is
//! not journaled; a full queue answers 429; the API key. Needs the
//! converted model: run `models/fetch` first.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;

/// A running server.
struct Server {
    child: Child,
    address: String,
    state: PathBuf,
    /// The state directory when the server made its own.
    _temporary: Option<tempfile::TempDir>,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// A server with a state directory of its own.
    fn start(extra: &[&str]) -> Server {
        let temporary = tempfile::tempdir().unwrap();
        let mut server = Server::start_in(temporary.path(), extra);
        server._temporary = Some(temporary);
        server
    }

    fn start_in(state: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nocturne"))
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(extra)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (found, address) = std::sync::mpsc::channel();
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listen=").nth(1) {
                    let _ = found.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let address = address.recv_timeout(Duration::from_secs(60)).expect("the server printed its address");
        let server = Server { child, address, state: state.to_path_buf(), _temporary: None, log };
        let started = Instant::now();
        while server.request("GET", "/health", &[], "").0 != 200 {
            assert!(started.elapsed() < Duration::from_secs(60), "not ready: {}", server.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// One HTTP/1.1 request; returns status, head and body.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String, String) {
        http(&self.address, method, path, headers, body)
    }

    fn json(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, body) = self.request("POST", path, &[], &body.to_string());
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
    }

    /// SIGTERM, then the journal as dumped.
    fn stop(mut self) -> Vec<Value> {
        // SAFETY: kill has no memory preconditions; the pid is our live child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exit {status}: {}", self.log.lock().unwrap());
        dump(&self.state)
    }
}

/// One HTTP/1.1 request to `address`; returns status, head and body.
fn http(address: &str, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String, String) {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return (0, String::new(), String::new());
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", address, body.len());
    for h in headers {
        head += &format!("{h}\r\n");
    }
    if stream.write_all(format!("{head}\r\n").as_bytes()).is_err() {
        return (0, String::new(), String::new());
    }
    // A server may answer (413) and close before reading a large body.
    let _ = stream.write_all(body.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// The journal of the state directory `state`, as `journal dump` prints it.
fn dump(state: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_nocturne")).args(["journal", "dump", "--state-dir"]).arg(state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn kinds(records: &[Value], kind: &str) -> Vec<Value> {
    records.iter().filter(|r| r["kind"] == kind).cloned().collect()
}

fn question(max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": max_tokens})
}

#[test]
fn openai_python_client_completes_streams_lists_and_sends_feedback() {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = Command::new(format!("{root}/scripts/python-openai")).output().unwrap();
    assert!(python.status.success(), "{}", String::from_utf8_lossy(&python.stderr));
    let python = String::from_utf8(python.stdout).unwrap();
    let server = Server::start(&[]);
    let out = Command::new(python.trim()).arg(format!("{root}/tests/serve_openai.py")).arg(format!("http://{}/v1", server.address)).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), server.log.lock().unwrap());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["models"], json!(["smollm2-135m-instruct-int8"]));
    assert!(seen["text"].as_str().unwrap().contains("Paris"), "{seen}");
    assert_eq!(seen["streamed"], seen["text"], "streamed chunks reassemble to the greedy reply");
    assert_eq!((&seen["finish_reason"], &seen["stream_finish_reason"]), (&json!("stop"), &json!("stop")));
    assert_eq!(seen["completion_tokens"], seen["stream_completion_tokens"]);
    assert_eq!((&seen["id"], &seen["header_interaction"]), (&json!("chatcmpl-1"), &json!("1")));
    assert_eq!(seen["stream_interaction"], 2);
    assert_eq!((&seen["feedback_status"], &seen["feedback"]["interaction"]), (&json!(200), &json!(1)));

    let journal = server.stop();
    let interactions = kinds(&journal, "interaction");
    assert_eq!(interactions.len(), 2, "each completion journaled once: {journal:?}");
    assert_eq!(interactions[0]["lsn"], 1);
    assert_eq!(interactions[0]["prompt"], "What is the capital of France?");
    assert_eq!(interactions[0]["reply"], seen["text"]);
    let feedback = kinds(&journal, "feedback");
    assert_eq!(feedback.len(), 1, "{journal:?}");
    assert_eq!((&feedback[0]["interaction"], &feedback[0]["correction"]), (&json!(1), &json!("Paris, on the Seine.")));
}

#[test]
fn bad_requests_get_an_error_object_and_the_next_request_is_answered() {
    let server = Server::start(&[]);
    let user = |content: &str| json!([{"role": "user", "content": content}]);
    let long = "word ".repeat(3000);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", r#"{"messages": ["#.into(), 400, "not valid"),
        ("wrong type", json!({"messages": user("hi"), "temperature": "hot"}).to_string(), 400, "invalid type"),
        ("no messages field", json!({"model": "x"}).to_string(), 400, "messages"),
        ("unknown model", json!({"model": "gpt-9", "messages": user("hi")}).to_string(), 404, "does not exist"),
        ("over max tokens", json!({"messages": user("hi"), "max_tokens": 100000}).to_string(), 400, "limit"),
        ("over the context", json!({"messages": user(&long)}).to_string(), 400, "context holds"),
        ("temperature out of range", json!({"messages": user("hi"), "temperature": -1}).to_string(), 400, "temperature"),
        ("last message not the user's", json!({"messages": [{"role": "assistant", "content": "hi"}]}).to_string(), 400, "user"),
        ("unknown role", json!({"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "hi"}]}).to_string(), 400, "tool"),
        ("unknown persona", json!({"messages": user("hi"), "persona": "pirate"}).to_string(), 400, "no persona `pirate`"),
        ("body over the size limit", json!({"messages": user(&"x".repeat(2 << 20))}).to_string(), 413, "length limit"),
    ];
    for (name, body, status, said) in cases {
        let (got, head, text) = server.request("POST", "/v1/chat/completions", &[], &body);
        assert_eq!(got, status, "{name}: {head}\n{text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
        let message = error["error"]["message"].as_str().unwrap_or_else(|| panic!("{name}: no error object: {text}"));
        assert!(message.contains(said), "{name}: `{message}` does not say `{said}`");
        let (ok, reply) = server.json("/v1/chat/completions", &question(2));
        assert_eq!(ok, 200, "after {name}: {reply}");
    }
    for (name, body, said) in [
        ("feedback on no interaction", json!({"interaction": 999, "thumbs": "up"}), "no interaction 999"),
        ("rating out of range", json!({"interaction": 1, "rating": 9}), "1 to 5"),
        ("empty feedback", json!({"interaction": 1}), "carries nothing"),
        ("not an id", json!({"interaction": "abc", "rating": 3}), "not an interaction id"),
    ] {
        let (status, error) = server.json("/v1/feedback", &body);
        assert_eq!(status, 400, "{name}: {error}");
        assert!(error["error"]["message"].as_str().unwrap().contains(said), "{name}: {error}");
    }
    let journal = server.stop();
    assert_eq!(kinds(&journal, "interaction").len(), 11, "only the good requests are journaled");
    assert!(kinds(&journal, "feedback").is_empty());
}

/// Opens a streamed completion and reads until `events` data lines arrived.
fn open_stream(server: &Server, events: usize) -> TcpStream {
    let body = json!({"messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to sing."}],
                      "temperature": 0, "max_tokens": 500, "stream": true})
    .to_string();
    let mut stream = TcpStream::connect(&server.address).unwrap();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all((head + &body).as_bytes()).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < events {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early: {seen}");
        seen += &String::from_utf8_lossy(&buf[..n]);
    }
    stream
}

#[test]
fn a_client_leaving_mid_stream_frees_the_slot_and_is_not_journaled() {
    let server = Server::start(&[]);
    drop(open_stream(&server, 3));
    let (status, reply) = server.json("/v1/chat/completions", &question(8));
    assert_eq!(status, 200, "{reply}");
    let log = server.log.lock().unwrap().clone();
    let (status, _, metrics) = server.request("GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert!(metrics.contains("nocturne_slots_busy 0"), "no slot leaked: {metrics}");
    assert!(metrics.contains("nocturne_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"), "{metrics}");
    assert!(metrics.contains("nocturne_time_to_first_token_seconds_bucket"), "{metrics}");
    let journal = server.stop();
    let interactions = kinds(&journal, "interaction");
    assert_eq!(interactions.len(), 1, "only the finished request: {journal:?}");
    assert_eq!(interactions[0]["prompt"], "What is the capital of France?");
    assert!(log.contains("client went away"), "{log}");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Arc::new(Server::start(&["--queue", "1"]));
    let running = open_stream(&server, 2);
    let queued = {
        let server = server.clone();
        std::thread::spawn(move || server.json("/v1/chat/completions", &question(4)))
    };
    std::thread::sleep(Duration::from_millis(300));
    let (status, head, body) = server.request("POST", "/v1/chat/completions", &[], &question(4).to_string());
    assert_eq!(status, 429, "{head}\n{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    assert!(body.contains("queue is full"), "{body}");
    drop(running);
    let (status, reply) = queued.join().unwrap();
    assert_eq!(status, 200, "the queued request is answered once the slot frees: {reply}");
    let server = Arc::into_inner(server).unwrap();
    assert_eq!(kinds(&server.stop(), "interaction").len(), 1);
}

#[test]
fn the_api_key_is_required_except_for_health() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "s3cret\n").unwrap();
    let server = Server::start(&["--api-key-file", key.to_str().unwrap()]);
    assert_eq!(server.request("GET", "/v1/models", &[], "").0, 401);
    assert_eq!(server.request("GET", "/v1/models", &["Authorization: Bearer wrong"], "").0, 401);
    let (status, _, body) = server.request("GET", "/v1/models", &["Authorization: Bearer s3cret"], "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.request("GET", "/health", &[], "").0, 200);
    server.stop();
}

#[test]
fn a_persona_sets_the_system_prompt_unless_a_system_message_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("personas.toml");
    std::fs::write(&file, "[terse]\nsystem = \"Answer in one word.\"\n").unwrap();
    let server = Server::start(&["--personas", file.to_str().unwrap()]);
    let mut request = question(4);
    request["persona"] = json!("terse");
    assert_eq!(server.json("/v1/chat/completions", &request).0, 200);
    request["messages"] = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]);
    assert_eq!(server.json("/v1/chat/completions", &request).0, 200);
    request["persona"] = json!("formal");
    let (status, error) = server.json("/v1/chat/completions", &request);
    assert_eq!(status, 400, "only the file's personas: {error}");
    assert_eq!(error["error"]["param"], "persona");
    let journaled: Vec<(Value, Value)> = kinds(&server.stop(), "interaction").iter().map(|r| (r["system"].clone(), r["persona"].clone())).collect();
    assert_eq!(journaled, [(json!("Answer in one word."), json!("terse")), (json!("Be brief."), Value::Null)], "the persona is journaled when it gave the prompt");
}

#[test]
fn two_slots_answer_two_requests_at_once() {
    let server = Server::start(&["--slots", "2"]);
    let (first, second) = (open_stream(&server, 2), open_stream(&server, 2));
    let (_, _, metrics) = server.request("GET", "/metrics", &[], "");
    assert!(metrics.contains("nocturne_slots 2") && metrics.contains("nocturne_slots_busy 2"), "{metrics}");
    drop((first, second));
    let (status, reply) = server.json("/v1/chat/completions", &question(4));
    assert_eq!(status, 200, "{reply}");
    let (_, _, metrics) = server.request("GET", "/metrics", &[], "");
    assert!(metrics.contains("nocturne_slots_busy 0"), "{metrics}");
    assert_eq!(kinds(&server.stop(), "interaction").len(), 1, "the two cancelled streams are not journaled");
}

#[test]
fn load_from_16_clients_journals_every_completed_response_once_and_leaks_no_slot() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_nocturne"))
        .args(["bench", "--serve", "--requests", "200", "--clients", "16", "--max-tokens", "8", "--seed", "7"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k}: {report}"));
    assert_eq!(count("completed") + count("cancelled"), 200, "every request completed or was dropped by its client: {report}");
    assert!(count("cancelled") > 0 && count("completed") > 150, "{report}");
    assert_eq!(report["completed_journaled_once"], true, "{report}");
    // A dropped stream may still finish before the server notices; none is journaled twice.
    let journaled = count("journal_interactions");
    assert!(journaled >= count("completed") && journaled <= 200, "{report}");
    assert_eq!((&report["slots_busy_at_end"], &report["clean_exit"]), (&json!(0.0), &json!(true)), "{report}");
    // Resident memory: the plan, the mapped int8 pack, and 32 MiB for the rest
    // (code, tokenizer, HTTP runtime, thread stacks).
    let pack = std::fs::metadata(format!("{root}/models/cache/smollm2-135m-instruct/int8/model.safetensors")).unwrap().len();
    let bound = report["memory_plan_bytes"].as_f64().unwrap() as u64 + pack + (32 << 20);
    assert!(count("peak_rss_bytes") <= bound, "peak RSS {} over plan + pack + 32 MiB = {bound}", count("peak_rss_bytes"));
}

#[test]
fn sigkill_during_load_loses_no_interaction_a_client_received() {
    let state = tempfile::tempdir().unwrap();
    let mut rng: u64 = 0x5eed_c0de;
    let mut received = Vec::new();
    for _ in 0..50 {
        let mut server = Server::start_in(state.path(), &[]);
        let address = server.address.clone();
        let stop = std::sync::atomic::AtomicBool::new(false);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = Duration::from_millis(rng % 500);
        let answered = std::sync::atomic::AtomicUsize::new(0);
        let ids: Vec<u64> = std::thread::scope(|scope| {
            let clients: Vec<_> = (0..4)
                .map(|c| {
                    let (address, stop, answered) = (&address, &stop, &answered);
                    scope.spawn(move || {
                        let mut ids = Vec::new();
                        let mut body = question(3 + c);
                        body["stream"] = json!(c % 2 == 1);
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let (status, head, text) = http(address, "POST", "/v1/chat/completions", &[], &body.to_string());
                            // Only a response that reached the client in full counts.
                            let complete = if c % 2 == 1 { text.contains("data: [DONE]") } else { serde_json::from_str::<Value>(&text).is_ok() };
                            if status == 200 && complete {
                                let id = head.lines().find_map(|l| l.strip_prefix("x-nocturne-interaction: ")).map(str::to_string).or_else(|| {
                                    text.split("\"interaction\":").nth(1).map(|t| t.chars().take_while(char::is_ascii_digit).collect())
                                });
                                ids.push(id.and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("no interaction id: {head}\n{text}")));
                                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        ids
                    })
                })
                .collect();
            // Under load: once a reply went out, at a random moment within half a second.
            let started = Instant::now();
            while answered.load(std::sync::atomic::Ordering::Relaxed) == 0 && started.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(kill_after);
            server.child.kill().unwrap();
            server.child.wait().unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
        });
        received.extend(ids);
    }
    let verify = Command::new(env!("CARGO_BIN_EXE_nocturne")).args(["journal", "verify", "--state-dir"]).arg(state.path()).output().unwrap();
    assert!(verify.status.success(), "{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    let journaled: std::collections::HashSet<u64> =
        kinds(&dump(state.path()), "interaction").iter().map(|r| r["lsn"].as_u64().unwrap()).collect();
    assert!(received.len() >= 50, "only {} replies reached clients in 50 rounds", received.len());
    let missing: Vec<_> = received.iter().filter(|id| !journaled.contains(id)).collect();
    assert!(missing.is_empty(), "interactions clients received but the journal lost: {missing:?}");
}

#[test]
fn an_adapter_installed_under_load_is_used_by_later_requests_without_a_failed_one() {
    use nocturne::signing::{self, PublicKeyFile};
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let trainer = signing::generate().unwrap();
    let trainer_pub = tmp.path().join("trainer.pub");
    std::fs::write(&trainer_pub, PublicKeyFile { device: None, key: trainer.verifying_key() }.to_text()).unwrap();
    let nocturne = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_nocturne")).args(args).arg("--state-dir").arg(&state).output().unwrap();
    assert!(nocturne(&["sync", "trust", trainer_pub.to_str().unwrap()]).status.success());
    let server = Server::start_in(&state, &["--slots", "2"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let answered = std::sync::atomic::AtomicUsize::new(0);
    // Counted in replies, not seconds: a slow or busy machine answers fewer a second.
    let wait_for = |replies: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while answered.load(std::sync::atomic::Ordering::Relaxed) < replies && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (server, stop, answered) = (&server, &stop, &answered);
                scope.spawn(move || {
                    let mut statuses = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        statuses.push(server.json("/v1/chat/completions", &question(3)).0);
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    statuses
                })
            })
            .collect();
        wait_for(3);
        let pack = nocturne::weights::ModelPack::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/smollm2-135m-instruct/int8")).unwrap();
        let usb = tmp.path().join("usb");
        let bundle = support::adapter::random_adapter(&usb, &pack, &trainer, 4, &[nocturne::adapter::Target::Q], 0.01, 12);
        let out = nocturne(&["sync", "import", "--from", usb.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&*bundle.file_stem().unwrap().to_string_lossy()));
        // Requests keep coming while the server switches: every slot answers several after the install.
        wait_for(answered.load(std::sync::atomic::Ordering::Relaxed) + 8);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    assert!(statuses.len() >= 11 && statuses.iter().all(|&s| s == 200), "every request answered: {statuses:?}");
    let adapters: Vec<Value> = kinds(&server.stop(), "interaction").iter().map(|r| r["adapter"].clone()).collect();
    let first_adapted = adapters.iter().position(|a| !a.is_null()).expect("later requests use the installed adapter");
    assert!(first_adapted > 0, "earlier requests ran on the base model: {adapters:?}");
    assert!(adapters[first_adapted..].iter().all(|a| *a == adapters[first_adapted]), "once switched, every slot stays on it: {adapters:?}");
}

#[test]
fn text_completions_continue_the_raw_prompt_whole_and_streamed() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 3});
    let (status, reply) = server.json("/v1/completions", &body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!((&reply["object"], &reply["id"]), (&json!("text_completion"), &json!("cmpl-1")));
    let text = reply["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{reply}");
    assert_eq!((&reply["choices"][0]["finish_reason"], &reply["usage"]["completion_tokens"]), (&json!("length"), &json!(3)));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, _, events) = server.request("POST", "/v1/completions", &[], &streamed.to_string());
    assert_eq!(status, 200);
    let chunks: Vec<Value> = events.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(joined, text, "chunks reassemble to the whole completion");
    assert!(events.contains("data: [DONE]"));
    let (status, error) = server.json("/v1/completions", &json!({"prompt": ["a", "b"]}));
    assert_eq!((status, &error["error"]["param"]), (400, &json!("prompt")));
    let (status, _) = server.json("/v1/feedback", &json!({"interaction": "cmpl-1", "rating": 5}));
    assert_eq!(status, 200);
    let journal = server.stop();
    let interactions = kinds(&journal, "interaction");
    assert_eq!(interactions.len(), 2);
    assert_eq!((&interactions[0]["system"], &interactions[0]["prompt"]), (&json!(""), &json!("The capital of France is")));
    assert_eq!(kinds(&journal, "feedback")[0]["interaction"], 1);
}

#[test]
fn with_no_journal_replies_are_unrecorded_and_feedback_is_refused() {
    let server = Server::start(&["--no-journal"]);
    let (status, head, body) = server.request("POST", "/v1/chat/completions", &[], &question(3).to_string());
    assert_eq!(status, 200, "{body}");
    assert!(!head.to_ascii_lowercase().contains("x-nocturne-interaction"), "{head}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert!(reply["id"].as_str().unwrap().starts_with("chatcmpl-unrecorded-"), "{reply}");
    let (status, error) = server.json("/v1/feedback", &json!({"interaction": 1, "rating": 4}));
    assert_eq!(status, 400);
    assert!(error["error"]["message"].as_str().unwrap().contains("journaling is off"), "{error}");
    let state = server.state.clone();
    let (mut child, _log) = (server.child, server.log);
    // SAFETY: kill has no memory preconditions; the pid is our live child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!state.join("journal").exists(), "nothing was written to the state directory's journal");
}

/// A correction sent to `/v1/feedback` is recalled by the next chat
/// completion (whole and streamed), listed in the response, and journaled
/// with the interaction; a raw text completion gets no recall.
#[test]
fn a_correction_sent_as_feedback_is_recalled_by_the_next_request() {
    let server = Server::start(&[]);
    let taught = "My favourite colour is teal.";
    let ask = |question: &str, stream: bool| {
        json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 16, "stream": stream})
    };
    let (status, first) = server.json("/v1/chat/completions", &ask("What is my favourite colour?", false));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["recalled"], json!([]), "{first}");
    let interaction: u64 = first["id"].as_str().unwrap().trim_start_matches("chatcmpl-").parse().unwrap();
    let (status, recorded) = server.json("/v1/feedback", &json!({"interaction": interaction, "correction": taught}));
    assert_eq!(status, 200, "{recorded}");

    let (status, second) = server.json("/v1/chat/completions", &ask("Which colour is my favourite?", false));
    assert_eq!(status, 200, "{second}");
    assert!(second["choices"][0]["message"]["content"].as_str().unwrap().starts_with(taught), "{second}");
    assert_eq!(second["recalled"][0]["interaction"].as_u64(), Some(interaction), "{second}");

    let (status, _, body) = server.request("POST", "/v1/chat/completions", &[], &ask("What is my favourite colour?", true).to_string());
    assert_eq!(status, 200, "{body}");
    let chunks: Vec<Value> =
        body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let texts: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).filter(|t| !t.is_empty()).collect();
    assert_eq!(texts.first().copied(), Some(taught), "the taught answer is the first text streamed: {body}");
    assert_eq!(chunks.last().unwrap()["recalled"][0]["interaction"].as_u64(), Some(interaction), "{body}");

    let (status, raw) = server.json("/v1/completions", &json!({"prompt": "What is my favourite colour?", "temperature": 0, "max_tokens": 4}));
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw["recalled"], json!([]), "{raw}");

    let journal = server.stop();
    let recalled: Vec<Value> = kinds(&journal, "interaction").iter().map(|r| r["recalled"].clone()).collect();
    assert_eq!(recalled, [json!([]), json!([interaction]), json!([interaction]), json!([])]);
    let replies: Vec<Value> = kinds(&journal, "interaction").iter().map(|r| r["reply"].clone()).collect();
    assert!(replies[1].as_str().unwrap().starts_with(taught), "the journaled reply holds the recalled prefix: {replies:?}");
}

/// `--no-recall` answers as if nothing was taught.
#[test]
fn with_no_recall_a_taught_correction_is_not_recalled() {
    let state = tempfile::tempdir().unwrap();
    let question = json!({"messages": [{"role": "user", "content": "What is my favourite colour?"}], "temperature": 0, "max_tokens": 16});
    let server = Server::start_in(state.path(), &[]);
    let (_, first) = server.json("/v1/chat/completions", &question);
    let interaction: u64 = first["id"].as_str().unwrap().trim_start_matches("chatcmpl-").parse().unwrap();
    let (status, _) = server.json("/v1/feedback", &json!({"interaction": interaction, "correction": "My favourite colour is teal."}));
    assert_eq!(status, 200);
    server.stop();
    let server = Server::start_in(state.path(), &["--no-recall"]);
    let (_, again) = server.json("/v1/chat/completions", &question);
    assert_eq!(again["recalled"], json!([]), "{again}");
    assert_eq!(again["choices"][0]["message"]["content"], first["choices"][0]["message"]["content"]);
    server.stop();
}
