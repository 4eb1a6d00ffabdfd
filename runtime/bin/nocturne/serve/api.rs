//! The wire format of the local API: OpenAI's chat-completions request and
//! response objects (the subset a local runtime serves, as llama.cpp's
//! `llama-server` and Ollama do), its streamed chunks, its error object,
//! and our feedback extension. Field names and shapes follow OpenAI's API
//! reference (`POST /v1/chat/completions`, "The chat completion object",
//! "The chat completion chunk object", error responses).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nocturne::journal::StopReason;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `POST /v1/chat/completions` body. Fields we do not serve (`n`, `tools`,
/// `logprobs`, …) are ignored, as other local servers do.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Must name the served model when present.
    pub model: Option<String>,
    /// The conversation so far; the last message is the user's.
    pub messages: Vec<Message>,
    /// Our extension: a persona's system prompt (a system message wins).
    pub persona: Option<String>,
    /// Sampling, limits and streaming.
    #[serde(flatten)]
    pub limits: Limits,
}

/// `POST /v1/completions` body (OpenAI's legacy text completions): the
/// prompt is completed as raw text, without the chat template.
#[derive(Debug, Deserialize)]
pub struct TextRequest {
    /// Must name the served model when present.
    pub model: Option<String>,
    /// The text to continue: a string, or a list holding one string.
    pub prompt: Prompt,
    /// Sampling, limits and streaming.
    #[serde(flatten)]
    pub limits: Limits,
}

/// A text completion's prompt.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// A list of prompts (one is served).
    Many(Vec<String>),
}

/// The sampling, limit and streaming fields both completion requests share.
#[derive(Debug, Deserialize)]
pub struct Limits {
    /// Sampling temperature, 0 = greedy (default 1, as OpenAI's).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f32>,
    /// New tokens at most (capped by the profile's `max_new_tokens`).
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// One stop string or several.
    pub stop: Option<Stop>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `include_usage`: a last chunk with the token counts.
    pub stream_options: Option<StreamOptions>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message: `content` is a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: Content,
}

/// Message content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Parts; only `{"type": "text", "text": …}` parts are served.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// Part type (`text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

impl Content {
    /// The text, parts joined; an error names a part that is not text.
    pub fn text(&self) -> Result<String, String> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (kind, _) => Err(format!("content part of type `{kind}` is not served (text only)")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|t| t.concat()),
        }
    }
}

/// `POST /v1/feedback` body (our extension): the same record `nocturne
/// feedback` writes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The interaction: its number, or the completion id (`chatcmpl-N`).
    pub interaction: InteractionId,
    /// 1 (worst) to 5 (best).
    pub rating: Option<u8>,
    /// `"up"` or `"down"`.
    pub thumbs: Option<String>,
    /// The reply the user wanted.
    pub correction: Option<String>,
    /// The user asked for another reply.
    #[serde(default)]
    pub regenerated: bool,
    /// The user copied the reply.
    #[serde(default)]
    pub copied: bool,
    /// The user edited the reply.
    #[serde(default)]
    pub edited: bool,
    /// The user left right after the reply.
    #[serde(default)]
    pub abandoned: bool,
    /// Seconds until the user continued the conversation.
    pub follow_up_s: Option<u32>,
}

/// An interaction named by number or by completion id.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum InteractionId {
    /// The journal LSN.
    Number(u64),
    /// `chatcmpl-N` or `cmpl-N`.
    Completion(String),
}

impl InteractionId {
    /// The LSN, or an error naming what is wrong.
    pub fn lsn(&self) -> Result<u64, String> {
        match self {
            InteractionId::Number(n) => Ok(*n),
            InteractionId::Completion(id) => [Endpoint::Chat, Endpoint::Text]
                .iter()
                .find_map(|e| id.strip_prefix(e.id_prefix()))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("`{id}` is not an interaction id (a number, chatcmpl-N or cmpl-N)")),
        }
    }
}

/// Which completion API a request came through: they differ only in the
/// objects' shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Text,
}

impl Endpoint {
    /// Completion ids are this prefix and the interaction's LSN.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Text => "cmpl-",
        }
    }

    /// A finished completion object.
    pub fn completion(self, id: &str, created: u64, model: &str, reply: &str, reason: StopReason, usage: Usage) -> Value {
        let (object, choice) = match self {
            Endpoint::Chat => ("chat.completion", json!({"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish_reason(reason)})),
            Endpoint::Text => ("text_completion", json!({"index": 0, "text": reply, "logprobs": null, "finish_reason": finish_reason(reason)})),
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage})
    }

    /// A streamed chunk: `text` and `finish_reason` of choice 0 (`role`
    /// marks a chat stream's first chunk), or no choice and `usage` (the
    /// last chunk with `include_usage`).
    pub fn chunk(self, id: &str, created: u64, model: &str, text: Option<&str>, finish: Option<&str>, usage: Option<Usage>) -> Value {
        let (object, choice) = match self {
            Endpoint::Chat => {
                let delta = match (text, finish) {
                    (Some(t), _) => json!({"content": t}),
                    (None, None) => json!({"role": "assistant", "content": ""}),
                    (None, Some(_)) => json!({}),
                };
                ("chat.completion.chunk", json!({"index": 0, "delta": delta, "finish_reason": finish}))
            }
            Endpoint::Text => ("text_completion", json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})),
        };
        let choices = if usage.is_some() { json!([]) } else { json!([choice]) };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": choices, "usage": usage})
    }
}

/// OpenAI's `finish_reason` for our stop reason: the model or a stop string
/// ended the reply → `stop`; a token limit, the context or the deadline cut
/// it → `length`.
pub fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull | StopReason::Deadline => "length",
    }
}

/// `usage` of a completion.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Usage {
    /// Prompt tokens (chat template included).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// An error answered as OpenAI does: a status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What is wrong, naming the field or limit.
    pub message: String,
    /// The offending request field, if one.
    pub param: Option<&'static str>,
    /// Seconds after which a retry may succeed (429/503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param, retry_after: None }
    }

    /// Any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None, retry_after: None }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": null}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}
