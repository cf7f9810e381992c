"""`sparse-llm serve` argument errors (caught before any model is loaded) and the protocol's own messages."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from sparse_llm.cli import main
from sparse_llm.serve.errors import validation_message
from sparse_llm.serve.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("argv,fragment", [
    (["serve", "a.gguf", "--model", "b.gguf"], "MODEL 'a.gguf' and --model 'b.gguf' differ"),
    (["serve", "--port", "0"], "--port must be in 1..65535"),
    (["serve", "--api-key", " "], "--api-key must not be empty"),
])
def test_serve_cli_errors(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def _message(model, body) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return validation_message(e.value.errors())


def test_validation_messages_name_the_field_and_value():
    assert _message(CompletionRequest, {"prompt": 3}) == (
        "prompt: prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists (got 3)",
        "prompt")
    assert _message(CompletionRequest, {"prompt": [1, -2]}) == ("prompt: token ids must be >= 0 (got [1, -2])", "prompt")
    msg, param = _message(CompletionRequest, {"prompt": "x", "n": "a", "temperature": "b", "top_p": "c", "seed": "d"})
    assert "(and 1 more fields)" in msg and param in ("n", "temperature", "top_p", "seed")
    msg, param = _message(ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]})
    assert param.startswith("messages.0.content") and "text" in msg
    assert _message(ChatCompletionRequest, {})[0] == "messages: Field required"


def test_request_defaults_and_accepted_shapes():
    assert CompletionRequest(prompt=[[1, 2], [3]]).prompt == [[1, 2], [3]]
    assert CompletionRequest(prompt="x").max_tokens == 16  # OpenAI's default for completions
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                                 max_completion_tokens=5)
    assert chat.messages[0].text() == "ab" and chat.output_budget == 5
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).output_budget is None  # the rest of the context
