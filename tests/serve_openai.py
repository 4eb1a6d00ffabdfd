"""Drives `nocturne serve` with OpenAI's own Python client (the pinned
`openai` package): a greedy chat completion, the same request streamed,
models.list, then feedback on the first completion through our extension
endpoint. Prints one JSON object with what it saw; tests/serve.rs checks it.

Usage: serve_openai.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
"""

import json
import sys

import urllib.request

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
question = [{"role": "user", "content": "What is the capital of France?"}]

models = [m.id for m in client.models.list()]
raw = client.chat.completions.with_raw_response.create(model=models[0], messages=question, temperature=0, max_tokens=40)
completion = raw.parse()

chunks = client.chat.completions.create(
    model=models[0], messages=question, temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True}
)
streamed, finish, usage, stream_interaction = "", None, None, None
for chunk in chunks:
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        streamed += choice.delta.content or ""
        finish = choice.finish_reason or finish
    stream_interaction = (chunk.model_extra or {}).get("interaction", stream_interaction)

body = json.dumps({"interaction": completion.id, "thumbs": "down", "correction": "Paris, on the Seine."}).encode()
request = urllib.request.Request(base_url + "/feedback", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request) as response:
    feedback_status, feedback = response.status, json.load(response)

print(
    json.dumps(
        {
            "models": models,
            "id": completion.id,
            "header_interaction": raw.headers.get("x-nocturne-interaction"),
            "text": completion.choices[0].message.content,
            "finish_reason": completion.choices[0].finish_reason,
            "completion_tokens": completion.usage.completion_tokens,
            "streamed": streamed,
            "stream_finish_reason": finish,
            "stream_completion_tokens": usage,
            "stream_interaction": stream_interaction,
            "feedback_status": feedback_status,
            "feedback": feedback,
        }
    )
)
