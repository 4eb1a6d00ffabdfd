//! `nocturne serve`: the local API apps on the device talk to, compatible
//! with OpenAI's chat completions (as llama.cpp's `llama-server` and Ollama
//! are), plus `POST /v1/feedback`, our extension. axum on a one-thread tokio
//! runtime takes the HTTP side; the model runs on the slot threads
//! ([`slot`], the profile's `[server] slots`, each with its own session),
//! fed through one bounded queue (`[server] queue`): a full queue answers 429 with
//! `Retry-After`. The listener is bound before the model loads, so
//! `GET /health` answers 503 while loading and 200 after.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions`
//! (streamed as server-sent events when asked), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (Prometheus), `POST /v1/feedback`. Every
//! completion is journaled as an interaction once its reply is complete; its
//! number comes back as the completion id (`chatcmpl-N`, `cmpl-N`), in the
//! `x-nocturne-interaction` header, and (streamed) as `interaction` in the
//! last chunk. A client that goes away stops its generation within one token,
//! and that reply is not journaled.
//!
//! Chat completions use recall memory as `chat` does (`--no-recall` turns
//! it off): a recalled reply prefix is the first text streamed, and the
//! response (or the last chunk) lists the recalled entries as `recalled`. A
//! correction sent to `/v1/feedback` is recalled from the next request on.

mod api;
mod slot;
mod telemetry;

use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use futures_util::stream::{self, Stream};
use nocturne::journal::{Feedback, ImplicitSignals, Thumbs};
use nocturne::profile::ACTIVE;
use nocturne::sampler::SamplerConfig;
use nocturne::session::{RequestOptions, Session};
use nocturne::tokenizer::{ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use self::api::{ApiError, ChatRequest, Endpoint, FeedbackRequest, Limits, Prompt, Stop, TextRequest, Usage};
use self::slot::{Completion, Event, SlotState, Work};
use crate::answer_recall::{Recall, RecallArgs};
use crate::args::ModelArgs;
use crate::journal::RecordArgs;
use crate::personas::{PersonaArgs, Personas};

/// Largest request body accepted, bytes (a larger one gets 413).
const MAX_BODY_BYTES: usize = 1 << 20;

/// Options of `nocturne serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback by default: apps on the device only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A file holding the API key clients must send as `Authorization: Bearer KEY` (`/health` stays open).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Requests that may wait for a slot; one more gets 429 (default: the profile's `[server] queue`).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    queue: Option<usize>,
    /// Sessions answering at once, the threads divided among them (default: the profile's `[server] slots`).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    slots: Option<usize>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    record: RecordArgs,
    #[command(flatten)]
    personas: PersonaArgs,
    #[command(flatten)]
    recall: RecallArgs,
}

/// What every handler shares.
struct App {
    /// Set once the model is loaded and the session allocated.
    loaded: Arc<OnceLock<Loaded>>,
    queue: crossbeam_channel::Sender<Work>,
    slot: Arc<SlotState>,
    model: String,
    api_key: Option<String>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    personas: Personas,
    slots: usize,
}

/// What loading gives the HTTP side.
struct Loaded {
    tokenizer: Arc<Tokenizer>,
    context_tokens: usize,
    plan_bytes: usize,
}

type Shared = State<Arc<App>>;

/// Runs the server until SIGTERM or Ctrl-C, then finishes the queued
/// requests, syncs the journal and returns.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("NOCTURNE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let api_key = match &args.api_key_file {
        Some(path) => {
            let key = std::fs::read_to_string(path).with_context(|| format!("cannot read the API key file {}", path.display()))?;
            let key = key.trim().to_string();
            if key.is_empty() {
                bail!("the API key file {} is empty", path.display());
            }
            Some(key)
        }
        None => None,
    };
    let personas = args.personas.load(args.record.state.state().root())?;
    let dir = args.model.dir();
    let model = dir.iter().rev().take(2).collect::<Vec<_>>().into_iter().rev().map(|c| c.to_string_lossy()).collect::<Vec<_>>().join("-");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the tokio runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().context("the listening socket has no address")?;
    tracing::info!(listen = %address, model = %model, "listening; loading the model");

    let queue_length = args.queue.unwrap_or(ACTIVE.server.queue as usize);
    let slots = args.slots.unwrap_or(ACTIVE.server.slots as usize);
    let (queue, work) = crossbeam_channel::bounded(queue_length);
    let metrics = telemetry::install()?;
    let app = Arc::new(App { loaded: Arc::new(OnceLock::new()), queue, slot: Arc::new(SlotState::default()), model, api_key, metrics, personas, slots });
    let (failed, failure) = oneshot::channel::<anyhow::Error>();
    let loader = {
        // Not the App: it holds the queue's sender, and the slots end when every sender is gone.
        let (loaded_cell, state, model_args, record) = (app.loaded.clone(), app.slot.clone(), args.model.clone(), args.record.clone());
        let recall_args = args.recall.clone();
        std::thread::Builder::new().name("nocturne-load".into()).spawn(move || {
            let opened = (|| -> anyhow::Result<_> {
                let (pack, tokenizer) = model_args.open()?;
                let recorder = record.recorder()?;
                Ok((pack, tokenizer, recorder))
            })();
            let (pack, tokenizer, recorder) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    let _ = failed.send(e);
                    return;
                }
            };
            let mut options = model_args.session_options();
            options.threads = (options.threads / slots).max(1);
            // Recall memory opens (encoder, index, journal top-up) while the sessions allocate.
            let opened = Recall::open_beside(
                &recall_args,
                &record.state.state(),
                || Session::start_slots(&pack, &tokenizer, &ACTIVE, options, slots),
                |sessions| sessions.iter().map(|s| s.memory_plan().total()).sum(),
            );
            let (recall, sessions) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    let _ = failed.send(e.into());
                    return;
                }
            };
            let context_tokens = sessions[0].decoder_ref().capacity();
            let recall_plan_bytes = recall.plan_bytes();
            let plan_bytes = sessions.iter().map(|s| s.memory_plan().total()).sum::<usize>() + recall_plan_bytes;
            tracing::info!(slots, threads_per_slot = options.threads, plan_bytes, recall_plan_bytes, context_tokens, "model loaded; ready");
            let tokenizer = Arc::new(tokenizer);
            let shared = slot::Shared {
                pack: &pack,
                tokenizer: &tokenizer,
                recall: Mutex::new(recall),
                acknowledgements: recorder.acknowledgements(),
                recorder: Mutex::new(recorder),
                state,
            };
            let _ = loaded_cell.set(Loaded { tokenizer: tokenizer.clone(), context_tokens, plan_bytes });
            std::thread::scope(|scope| {
                for (i, session) in sessions.into_iter().enumerate() {
                    let (shared, work) = (&shared, work.clone());
                    let spawned = std::thread::Builder::new().name(format!("nocturne-slot-{i}")).spawn_scoped(scope, move || slot::run(session, shared, work));
                    if let Err(e) = spawned {
                        tracing::error!(slot = i, error = %e, "cannot start the slot thread; serving with fewer slots");
                    }
                }
            });
            let recorder = shared.recorder.into_inner().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = recorder.close() {
                tracing::error!(error = %e, "the journal's final sync failed");
            }
        })?
    };
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route("/metrics", get(render_metrics))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        .route("/health", get(health))
        .layer(axum::middleware::from_fn(count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app);
    let load_error = runtime.block_on(async {
        let (stop, stopped) = oneshot::channel();
        let shutdown = async move {
            tokio::select! {
                () = shutdown_signal() => {}
                Ok(e) = failure => { let _ = stop.send(e); }
            }
        };
        axum::serve(listener, router).with_graceful_shutdown(shutdown).await.context("the server failed")?;
        anyhow::Ok(stopped.await.ok())
    })?;
    drop(runtime);
    if let Some(e) = load_error {
        return Err(e.context("the model could not be loaded"));
    }
    tracing::info!("shutting down: finishing queued requests and syncing the journal");
    loader.join().map_err(|_| anyhow::anyhow!("a slot thread panicked"))?;
    Ok(())
}

/// SIGTERM (systemd's stop) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}

/// Refuses requests without the API key, when one is set.
async fn authorize(State(app): Shared, request: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let sent = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(key.as_str()) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key (send Authorization: Bearer KEY)").into_response();
        }
    }
    next.run(request).await
}

/// Counts every answered request by endpoint and status.
async fn count(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let endpoint = match path.as_str() {
        "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/v1/feedback" | "/health" | "/metrics" => path,
        _ => "other".to_string(),
    };
    metrics::counter!(telemetry::REQUESTS, "endpoint" => endpoint, "status" => response.status().as_u16().to_string()).increment(1);
    response
}

async fn render_metrics(State(app): Shared) -> Response {
    metrics::gauge!(telemetry::QUEUE_DEPTH).set(app.queue.len() as f64);
    metrics::gauge!(telemetry::SLOTS).set(app.slots as f64);
    metrics::gauge!(telemetry::SLOTS_BUSY).set(app.slot.busy.load(std::sync::atomic::Ordering::Relaxed) as f64);
    metrics::gauge!(telemetry::UNSYNCED).set(app.slot.unsynced.load(std::sync::atomic::Ordering::Relaxed) as f64);
    metrics::gauge!(telemetry::MEMORY_PLAN).set(app.loaded.get().map_or(0.0, |l| l.plan_bytes as f64));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn health(State(app): Shared) -> Response {
    if app.loaded.get().is_some() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response()
    }
}

async fn models(State(app): Shared) -> Response {
    Json(json!({"object": "list", "data": [{"id": app.model, "object": "model", "created": 0, "owned_by": "nocturne"}]})).into_response()
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The body as JSON of type `T`, or a 4xx naming what is wrong.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::invalid(None, format!("the request body is not valid: {e}")))
}

/// A checked completion request, ready for the slot.
struct Prepared {
    prompt: Vec<u32>,
    messages: Option<Vec<ChatMessage>>,
    options: RequestOptions,
    texts: (String, String, Option<String>),
    position: (u64, u32),
    stream: bool,
    include_usage: bool,
}

/// A 404 unless `model` is absent or the one served.
fn check_model(app: &App, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(model) if model != app.model => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist; this server has `{}`", app.model),
            param: Some("model"),
            retry_after: None,
        }),
        _ => Ok(()),
    }
}

/// A 400 unless a prompt of `tokens` leaves room for a reply.
fn check_context(loaded: &Loaded, tokens: usize, param: &'static str) -> Result<(), ApiError> {
    if tokens + 1 > loaded.context_tokens {
        return Err(ApiError::invalid(
            Some(param),
            format!("the {param} take {tokens} tokens; the context holds {} and a reply needs at least one more", loaded.context_tokens),
        ));
    }
    Ok(())
}

/// The request options `limits` ask for (`default_max_tokens` when they
/// name none), checked against the profile.
fn request_options(limits: &Limits, default_max_tokens: u32) -> Result<RequestOptions, ApiError> {
    let max_new_tokens = match limits.max_completion_tokens.or(limits.max_tokens).unwrap_or(default_max_tokens) {
        0 => return Err(ApiError::invalid(Some("max_tokens"), "max_tokens must be at least 1")),
        n if n > ACTIVE.max_new_tokens => {
            return Err(ApiError::invalid(Some("max_tokens"), format!("max_tokens is {n}, over this device's limit of {}", ACTIVE.max_new_tokens)))
        }
        n => n as usize,
    };
    let temperature = nocturne::sampler::temperature(limits.temperature.unwrap_or(1.0)).map_err(|e| ApiError::invalid(Some("temperature"), e.to_string()))?;
    let top_p = nocturne::sampler::top_p(limits.top_p.unwrap_or(1.0)).map_err(|e| ApiError::invalid(Some("top_p"), e.to_string()))?;
    let stop = match &limits.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(v)) => return Err(ApiError::invalid(Some("stop"), format!("{} stop strings; at most 4", v.len()))),
    };
    Ok(RequestOptions {
        max_new_tokens,
        stop,
        sampler: SamplerConfig { temperature, top_k: 0, top_p, repetition_penalty: 1.0, seed: limits.seed.unwrap_or(0) },
        ..RequestOptions::for_profile(&ACTIVE)
    })
}

fn prepare_chat(app: &App, loaded: &Loaded, request: ChatRequest) -> Result<Prepared, ApiError> {
    check_model(app, request.model.as_deref())?;
    let mut system = None;
    let mut messages = Vec::new();
    for (i, m) in request.messages.iter().enumerate() {
        let text = m.content.text().map_err(|e| ApiError::invalid(Some("messages"), format!("messages[{i}]: {e}")))?;
        match m.role.as_str() {
            "system" | "developer" if messages.is_empty() => system = Some(text),
            "user" | "assistant" => messages.push(ChatMessage::new(&m.role, &text)),
            role => return Err(ApiError::invalid(Some("messages"), format!("messages[{i}]: role `{role}` is not served here (system first, then user and assistant)"))),
        }
    }
    let Some(last) = messages.last().filter(|m| m.role == "user") else {
        return Err(ApiError::invalid(Some("messages"), "the last message must be the user's"));
    };
    let user = last.content.clone();
    // An unknown persona is an error even where a system message wins over it.
    let persona = match &request.persona {
        Some(name) => Some((name, app.personas.system(name).map_err(|e| ApiError::invalid(Some("persona"), e.to_string()))?)),
        None => None,
    };
    // The persona is journaled when it gave the system prompt.
    let (system, persona) = match (system, persona) {
        (Some(system), _) => (system, None),
        (None, Some((name, prompt))) => (prompt.to_string(), Some(name.clone())),
        (None, None) => (DEFAULT_SYSTEM_PROMPT.to_string(), None),
    };
    let turn = messages.iter().filter(|m| m.role == "assistant").count();
    let mut hasher = DefaultHasher::new();
    (&system, &messages[0].content).hash(&mut hasher);
    messages.insert(0, ChatMessage::new("system", &system));
    let prompt = loaded.tokenizer.encode_chat(&messages, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    check_context(loaded, prompt.len(), "messages")?;
    let options = request_options(&request.limits, ACTIVE.max_new_tokens)?;
    let include_usage = request.limits.stream_options.is_some_and(|o| o.include_usage);
    Ok(Prepared {
        prompt,
        messages: Some(messages),
        options,
        texts: (system, user, persona),
        position: (hasher.finish(), turn as u32),
        stream: request.limits.stream,
        include_usage,
    })
}

/// OpenAI's default `max_tokens` of a text completion.
const TEXT_DEFAULT_MAX_TOKENS: u32 = 16;

fn prepare_text(app: &App, loaded: &Loaded, request: TextRequest) -> Result<Prepared, ApiError> {
    check_model(app, request.model.as_deref())?;
    let text = match request.prompt {
        Prompt::One(text) => text,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => return Err(ApiError::invalid(Some("prompt"), format!("{} prompts; one is served per request", v.len()))),
    };
    if text.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    let prompt = loaded.tokenizer.encode(&text).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
    check_context(loaded, prompt.len(), "prompt")?;
    let options = request_options(&request.limits, TEXT_DEFAULT_MAX_TOKENS.min(ACTIVE.max_new_tokens))?;
    let include_usage = request.limits.stream_options.is_some_and(|o| o.include_usage);
    Ok(Prepared {
        prompt,
        messages: None,
        options,
        texts: (String::new(), text, None),
        position: (rand_u64(), 0),
        stream: request.limits.stream,
        include_usage,
    })
}

/// Queues `work`, or answers 429 (queue full) or 503 (shutting down).
fn enqueue(app: &App, work: Work) -> Result<(), ApiError> {
    app.queue.try_send(work).map_err(|e| match e {
        crossbeam_channel::TrySendError::Full(_) => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("the request queue is full ({} waiting); retry later", app.queue.len()),
            param: None,
            retry_after: Some(1),
        },
        crossbeam_channel::TrySendError::Disconnected(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"),
    })
}

fn completion_id(endpoint: Endpoint, interaction: Option<u64>) -> String {
    match interaction {
        Some(lsn) => format!("{}{lsn}", endpoint.id_prefix()),
        None => format!("{}unrecorded-{:x}", endpoint.id_prefix(), rand_u64()),
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

async fn chat_completions(State(app): Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let loaded = loaded(&app)?;
    let prepared = prepare_chat(&app, loaded, parse(body)?)?;
    complete(&app, Endpoint::Chat, prepared).await
}

async fn text_completions(State(app): Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let loaded = loaded(&app)?;
    let prepared = prepare_text(&app, loaded, parse(body)?)?;
    complete(&app, Endpoint::Text, prepared).await
}

/// What loading gave, or 503 while the model loads.
fn loaded(app: &App) -> Result<&Loaded, ApiError> {
    app.loaded.get().ok_or(ApiError { retry_after: Some(5), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is loading") })
}

/// Queues a checked completion and answers it, whole or streamed.
async fn complete(app: &App, endpoint: Endpoint, p: Prepared) -> Result<Response, ApiError> {
    let (events, mut replies) = mpsc::unbounded_channel();
    let (stream, include_usage) = (p.stream, p.include_usage);
    enqueue(app, Work::Completion(Completion { prompt: p.prompt, messages: p.messages, options: p.options, texts: p.texts, position: p.position, events }))?;
    let created = now_s();
    if stream {
        return Ok(Sse::new(sse_stream(endpoint, app.model.clone(), created, replies, include_usage)).into_response());
    }
    while let Some(event) = replies.recv().await {
        match event {
            Event::Text(_) => {}
            Event::Refused(message) => return Err(ApiError::invalid(None, message)),
            Event::Done { reply, stats, interaction, recalled } => {
                let id = completion_id(endpoint, interaction);
                let usage = Usage::new(stats.prompt_tokens, stats.new_tokens);
                let mut body = endpoint.completion(&id, created, &app.model, &reply, stats.stop_reason, usage);
                body["recalled"] = recalled;
                let mut response = Json(body).into_response();
                if let Some(lsn) = interaction {
                    response.headers_mut().insert("x-nocturne-interaction", HeaderValue::from(lsn));
                }
                return Ok(response);
            }
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the slot ended the request without a reply"))
}

/// The server-sent events of a streamed completion: (chat) a first chunk
/// with the role, one chunk per piece of text, a last chunk with
/// `finish_reason` (and our `interaction`), the usage chunk when asked, then
/// `[DONE]`.
fn sse_stream(
    endpoint: Endpoint,
    model: String,
    created: u64,
    replies: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let id = format!("{}stream-{:x}", endpoint.id_prefix(), rand_u64());
    let data = |value: serde_json::Value| Ok(SseEvent::default().data(value.to_string()));
    let first = (endpoint == Endpoint::Chat).then(|| data(endpoint.chunk(&id, created, &model, None, None, None)));
    let head = stream::iter([stream::iter(first.into_iter().collect::<Vec<_>>())]);
    let body = stream::unfold(Some(replies), move |replies| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            let mut replies = replies?;
            let mut events = match replies.recv().await? {
                Event::Text(text) => {
                    let chunk = endpoint.chunk(&id, created, &model, Some(&text), None, None);
                    return Some((stream::iter(vec![data(chunk)]), Some(replies)));
                }
                Event::Refused(message) => vec![data(json!({"error": {"message": message, "type": "invalid_request_error"}}))],
                Event::Done { stats, interaction, recalled, .. } => {
                    let mut last = endpoint.chunk(&id, created, &model, None, Some(api::finish_reason(stats.stop_reason)), None);
                    last["interaction"] = json!(interaction);
                    last["recalled"] = recalled;
                    let mut events = vec![data(last)];
                    if include_usage {
                        let usage = Usage::new(stats.prompt_tokens, stats.new_tokens);
                        events.push(data(endpoint.chunk(&id, created, &model, None, None, Some(usage))));
                    }
                    events
                }
            };
            events.push(Ok(SseEvent::default().data("[DONE]")));
            Some((stream::iter(events), None))
        }
    });
    futures_util::StreamExt::flatten(futures_util::StreamExt::chain(head, body))
}

async fn feedback(State(app): Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let request: FeedbackRequest = parse(body)?;
    let interaction = request.interaction.lsn().map_err(|e| ApiError::invalid(Some("interaction"), e))?;
    if let Some(r) = request.rating.filter(|r| !(1..=5).contains(r)) {
        return Err(ApiError::invalid(Some("rating"), format!("rating is {r}; it must be 1 to 5")));
    }
    let thumbs = match request.thumbs.as_deref() {
        None => None,
        Some("up") => Some(Thumbs::Up),
        Some("down") => Some(Thumbs::Down),
        Some(t) => return Err(ApiError::invalid(Some("thumbs"), format!("thumbs is `{t}`; it must be `up` or `down`"))),
    };
    let correction = request.correction.filter(|c| !c.trim().is_empty()).map(std::borrow::Cow::Owned);
    let implicit = ImplicitSignals {
        regenerated: request.regenerated,
        copied: request.copied,
        edited: request.edited,
        abandoned: request.abandoned,
        follow_up_s: request.follow_up_s,
    };
    let feedback = Feedback { interaction, rating: request.rating, thumbs, correction, implicit };
    if feedback.rating.is_none() && feedback.thumbs.is_none() && feedback.correction.is_none() && feedback.implicit.is_empty() {
        return Err(ApiError::invalid(None, "the feedback carries nothing: give a rating, thumbs, a correction or an implicit signal"));
    }
    let (answer, recorded) = oneshot::channel();
    enqueue(&app, Work::Feedback(feedback, answer))?;
    match tokio::time::timeout(Duration::from_secs(600), recorded).await {
        Ok(Ok(Ok(lsn))) => Ok(Json(json!({"object": "feedback", "id": lsn, "interaction": interaction})).into_response()),
        Ok(Ok(Err(message))) => Err(ApiError::invalid(Some("interaction"), message)),
        _ => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the feedback was not recorded in time")),
    }
}
