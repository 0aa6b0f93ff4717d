//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::generation::{collect_all, compile_constraint, finish_label, off_the_workers, submit};
use super::json::ApiJson;
use super::protocol::{
    random_id, template_strings, unix_timestamp, validate_chat, ApiError, ChatChoice,
    ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    FinishReason, Rendering, StopReason, Usage, CHAT_ID_PREFIX,
};
use super::request_log::RequestLog;
use super::routes::{admit, check_model};
use super::sse::{self, ChunkFormat, UsageReport};
use super::state::AppState;
use super::tenant::Tenant;
use super::token_text::{chat_logprobs, listed_prompt_logprobs, TokenNames};
use super::tool_calls::{add_tools_prompt, parse_tool_calls, tool_constraint, ToolCallStream};
use crate::chat_template::{ChatMessage, ChatTemplateError, RenderBounds};
use crate::sampling::SampledToken;
use crate::tokenizer::chat_prompt::{encode_chat, ChatPrompt, ChatPromptError};
use crate::tokenizer::Tokenizer;

/// Template instructions a request's own chat template may run: a long conversation through a
/// tool-heavy template takes some ten thousand.
const REQUEST_TEMPLATE_FUEL: u64 = 2_000_000;

/// The conversation rendered by the model's chat template (or the request's own, where the
/// server trusts callers with one) and tokenized (template markup as control tokens, message
/// text as plain text), as the model will read it. Template variables become markup, so a
/// string among them that spells a special token is refused unless the server lets prompts
/// carry special tokens.
pub(super) async fn render_chat(
    state: &AppState,
    messages: Vec<ChatMessage>,
    rendering: Rendering,
) -> Result<ChatPrompt, ApiError> {
    let Rendering {
        options: how,
        template: own_template,
    } = rendering;
    if own_template.is_some() && !state.settings.trust_request_chat_template {
        return Err(ApiError::invalid_request(
            "this server does not take a request's own chat template: it runs template code on \
             the server, so it is for trusted callers only (`server.trust_request_chat_template`)",
            Some("chat_template"),
        ));
    }
    let tokenizer = &state.tokenizer;
    if !state.settings.allow_special_tokens_in_prompt {
        let spelled = template_strings(&how.kwargs)
            .into_iter()
            .find(|(_, s)| tokenizer.spells_special_token(s));
        if let Some((field, _)) = spelled {
            return Err(ApiError::invalid_request(
                format!(
                    "`{field}` spells one of the model's special tokens, which only the chat \
                     template itself may write"
                ),
                Some(field),
            ));
        }
    }
    // Rendering and tokenizing a long conversation takes milliseconds of CPU: off the async
    // workers, so `/health` and other connections keep answering.
    let (model_template, tokenizer) = (state.chat_template.clone(), state.tokenizer.clone());
    let bounds = RenderBounds {
        fuel: REQUEST_TEMPLATE_FUEL,
        // Room for every message of the largest body, and the markup around them.
        max_output_bytes: 2 * state.settings.body_limit_bytes + 64 * 1024,
    };
    let own_used = own_template.is_some();
    let render = move || match own_template {
        None => encode_chat(&model_template, &tokenizer, &messages, &how),
        Some(source) => encode_chat(
            &model_template.bounded(&source, bounds)?,
            &tokenizer,
            &messages,
            &how,
        ),
    };
    off_the_workers(render).await?.map_err(|e| match e {
        // The request's own template failing (compiling or rendering) is the caller's to read.
        ChatPromptError::Template(
            e @ (ChatTemplateError::Syntax(_)
            | ChatTemplateError::Render(_)
            | ChatTemplateError::TooLong(_)),
        ) if own_used => ApiError::invalid_request(e.to_string(), Some("chat_template")),
        ChatPromptError::Template(ChatTemplateError::Raised(msg)) => {
            ApiError::invalid_request(msg, Some("messages"))
        }
        ChatPromptError::Template(other) => {
            // minijinja's own words may quote what the template read: a patient's messages.
            tracing::error!(error = %other.redacted(), "the model's chat template failed");
            ApiError::invalid_request(
                "the model's chat template could not render these messages",
                Some("messages"),
            )
        }
        ChatPromptError::Unseparable => ApiError::invalid_request(e.to_string(), Some("messages")),
        ChatPromptError::FinalMessageNotRendered => {
            ApiError::invalid_request(e.to_string(), Some("continue_final_message"))
        }
        ChatPromptError::Tokenizer(e) => {
            tracing::error!(error = %e, "tokenizer failed");
            ApiError::internal()
        }
    })
}

/// Creates a chat completion (OpenAI's `POST /v1/chat/completions`).
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, body = ChatCompletionResponse, description = "A completion, or an SSE stream of ChatCompletionChunk when `stream` is true"),
              (status = 400, body = super::protocol::ErrorResponse), (status = 404, body = super::protocol::ErrorResponse),
              (status = 429, body = super::protocol::ErrorResponse), (status = 503, body = super::protocol::ErrorResponse)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    tenant: Option<Extension<Tenant>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let in_flight = admit(&state)?;
    let mut v = validate_chat(req, &state.settings.sampling_defaults)?;
    let model = check_model(&state, v.params.model.as_deref())?;
    if let Some(plan) = &v.tools {
        add_tools_prompt(&mut v.messages, plan);
    }
    let constraint = match &v.tools {
        Some(plan) => Some((tool_constraint(plan), "tools")),
        None => v.params.constraint.clone(),
    };
    let tenant = tenant.map(|Extension(t)| t);
    let constraint = compile_constraint(&state, constraint, tenant).await?;
    let ChatPrompt {
        text,
        token_ids: mut prompt,
    } = render_chat(&state, v.messages, v.rendering).await?;
    if let Some(t) = v.params.output.truncate_prompt {
        t.apply(&mut prompt, state.engine.limits().max_model_len);
    }
    let id = random_id(CHAT_ID_PREFIX);
    let mut log = RequestLog::new(id.clone(), "chat", model.clone(), in_flight);
    log.prompt_tokens = prompt.len();
    let streams = submit(
        &state,
        std::slice::from_ref(&prompt),
        &v.params,
        "messages",
        tenant,
        constraint,
    )
    .inspect_err(|e| log.status = e.status)?;
    let created = unix_timestamp();
    let timeout = state.settings.request_timeout;
    if state.settings.log_prompts {
        log.texts = Some((text, String::new()));
    }
    if v.params.stream {
        let report = UsageReport {
            usage: v.params.usage,
            prompt_tokens: vec![prompt.len(); streams.len()],
        };
        let format = ChatFormat {
            id,
            created,
            model,
            include_usage: v.params.usage.included(),
            logprobs: v.params.sampling.logprobs.is_some(),
            tokenizer: state.tokenizer.clone(),
            tokens_as_ids: v.params.output.tokens_as_ids,
            echo: v.echo.clone(),
            tools: v.tools.as_ref().map(|_| {
                (0..streams.len())
                    .map(|_| ToolCallStream::default())
                    .collect()
            }),
        };
        return Ok(sse::respond(streams, format, log, report, timeout).into_response());
    }
    let outs = collect_all(streams, &mut log, timeout)
        .await
        .inspect_err(|e| log.status = e.status)?;
    // Every choice scored the same prompt: the first one's are returned.
    let prompt_logprobs = v.params.prompt_scoring.listed.map(|k| {
        let scored = outs.first().and_then(|o| o.prompt_logprobs.as_deref());
        listed_prompt_logprobs(&state.tokenizer, &prompt, scored.unwrap_or_default(), k)
    });
    let names = TokenNames {
        tok: &state.tokenizer,
        as_ids: v.params.output.tokens_as_ids,
    };
    let choices = outs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let lp = chat_logprobs(names, &o.tokens);
            let calls = v.tools.as_ref().and_then(|_| parse_tool_calls(&o.text));
            let mut choice = ChatChoice::new(i as u32, o.text, lp, o.finish_reason);
            choice.stop_reason = o.stop_reason;
            if let (Some(echo), Some(content)) = (&v.echo, choice.message.content.as_mut()) {
                content.insert_str(0, echo);
            }
            if let Some(calls) = calls {
                choice.message.content = None;
                choice.message.tool_calls = Some(calls);
                if choice.finish_reason == FinishReason::Stop {
                    choice.finish_reason = FinishReason::ToolCalls;
                }
            }
            choice
        })
        .collect::<Vec<_>>();
    // With `log_prompts`, the first choice's completion (without the message `echo` puts
    // before it).
    if let (Some(t), Some(c)) = (log.texts.as_mut(), choices.first()) {
        let content = c.message.content.as_deref().unwrap_or_default();
        let echoed = v.echo.as_deref().unwrap_or_default();
        t.1 = content.strip_prefix(echoed).unwrap_or(content).to_owned();
    }
    let usage =
        Usage::new(log.prompt_tokens, log.completion_tokens).with_cached_tokens(log.cached_tokens);
    log.status = 200;
    log.finish_reason = choices
        .first()
        .map_or("none", |c| finish_label(c.finish_reason));
    let mut response = ChatCompletionResponse::new(id, created, model, choices, usage);
    response.prompt_logprobs = prompt_logprobs;
    Ok(Json(response).into_response())
}

/// Chat chunks: the role first, then content deltas.
struct ChatFormat {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    /// Logprobs name tokens `token_id:{id}`.
    tokens_as_ids: bool,
    /// The text `echo` puts first in every choice (sent with its role).
    echo: Option<String>,
    /// Per choice, with tools: the parser turning its text into `delta.tool_calls`.
    tools: Option<Vec<ToolCallStream>>,
}

impl ChunkFormat for ChatFormat {
    fn opening(&self, index: u32) -> Option<serde_json::Value> {
        let mut choice = ChatChunkChoice::role(index);
        if let Some(echo) = &self.echo {
            choice.delta.content = Some(echo.clone());
        }
        let chunk = ChatCompletionChunk::new(
            &self.id,
            self.created,
            &self.model,
            vec![choice],
            self.include_usage,
        );
        serde_json::to_value(chunk).ok()
    }

    fn content(
        &mut self,
        index: u32,
        text: String,
        tokens: &[SampledToken],
        finish: Option<(FinishReason, Option<StopReason>)>,
    ) -> serde_json::Value {
        let names = TokenNames {
            tok: &self.tokenizer,
            as_ids: self.tokens_as_ids,
        };
        let lp = chat_logprobs(names, tokens);
        let (finish, stop_reason) = finish.unzip();
        let mut choice = ChatChunkChoice::content(index, text, lp, finish);
        choice.stop_reason = stop_reason.flatten();
        let stream = self.tools.as_mut().and_then(|t| t.get_mut(index as usize));
        if let Some(stream) = stream {
            let piece = stream.push(choice.delta.content.as_deref().unwrap_or(""));
            choice.delta = ChatDelta {
                role: None,
                content: piece.content,
                tool_calls: (!piece.tool_calls.is_empty()).then_some(piece.tool_calls),
            };
            if stream.has_calls() && choice.finish_reason == Some(FinishReason::Stop) {
                choice.finish_reason = Some(FinishReason::ToolCalls);
            }
        }
        let chunk = ChatCompletionChunk::new(
            &self.id,
            self.created,
            &self.model,
            vec![choice],
            self.include_usage,
        );
        serde_json::to_value(chunk).unwrap_or_default()
    }

    fn usage(&self, usage: Usage) -> serde_json::Value {
        serde_json::to_value(ChatCompletionChunk::usage(
            &self.id,
            self.created,
            &self.model,
            usage,
        ))
        .unwrap_or_default()
    }

    fn wants_logprobs(&self) -> bool {
        self.logprobs
    }
}
