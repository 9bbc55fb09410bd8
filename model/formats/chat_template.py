"""Chat templates as transformers renders them: a checkpoint's own Jinja `chat_template` (from
`chat_template.jinja`, `additional_chat_templates/*.jinja` or `tokenizer_config.json`, also a dict of named
templates), rendered in a sandboxed environment with transformers' options and helpers (trim_blocks,
lstrip_blocks, loop controls, `{% generation %}`, `raise_exception`, `strftime_now`, its `tojson`, `dict`,
`namespace`), with the checkpoint's special tokens (`bos_token`, `eos_token`, …) and `add_generation_prompt`,
`tools`, `documents` and any other keyword in scope. A checkpoint without a template gets `BUILTIN`, Meta's
Llama 3.1 message format (llama-models' ChatFormat: `tool` is sent as `ipython`, no system block added).

Encoding: the template's own control tokens ("<|eot_id|>" written by the template) become special tokens; the
same strings inside messages, tools or documents stay text (they are marked before rendering, as transformers
does with `sanitize_control_tokens=True`). Training masks come from rendering prefixes (`chat_document`).
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them
MARK_START, MARK_END = "\U000f0000", "\U000f0001"  # private-use characters around control tokens in user strings
STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

BUILTIN = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
BUILTIN_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


class ChatTemplateError(ValueError):
    pass


class _Generation(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` without the attributes of the dict type (transformers' sandbox hardening)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace that refuses underscore-prefixed attributes (as transformers' does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class ChatTemplate:
    """One checkpoint's chat template(s) and the special tokens its renders see."""

    def __init__(self, source: str | dict[str, str], specials: dict[str, str], where: str = "built-in"):
        self.where, self.specials = where, dict(specials)
        named = source if isinstance(source, dict) else {"default": source}
        env = environment()
        self.templates = {}
        for name, text in named.items():
            if not isinstance(text, str):
                raise ChatTemplateError(f"{where}: chat template {name!r} is not a string")
            try:
                self.templates[name] = env.from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"{where}: chat template {name!r}, line {e.lineno}: {e.message}") from None

    @classmethod
    def builtin(cls) -> ChatTemplate:
        return cls(BUILTIN, BUILTIN_SPECIALS)

    @classmethod
    def from_dir(cls, d: Path) -> ChatTemplate | None:
        """The template of a checkpoint directory, where transformers finds it; None when it has none. As in
        transformers, `chat_template.jinja` and `additional_chat_templates/` take priority over the config."""
        cfg_path = d / "tokenizer_config.json"
        cfg = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"{cfg_path}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise ChatTemplateError(f"{cfg_path}: expected a JSON object")
        named = {}
        if (d / "chat_template.jinja").is_file():
            named["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if (d / "additional_chat_templates").is_dir():
            for f in sorted((d / "additional_chat_templates").glob("*.jinja")):
                named[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        where = str(d / "chat_template.jinja") if named else str(cfg_path)
        source = (named["default"] if list(named) == ["default"] else named) if named else cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": …, "template": …}, …]
            try:
                source = {t["name"]: t["template"] for t in source}
            except (TypeError, KeyError):
                raise ChatTemplateError(f"{cfg_path}: chat_template: expected a string or a list of "
                                        f"{{'name', 'template'}} objects") from None
        if source is None:
            return None
        specials = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(cfg.get(k))) is not None}
        return cls(source, specials, where)

    def select(self, name: str | None = None, tools=None) -> jinja2.Template:
        """transformers' choice among named templates: `name`, else "tool_use" when tools are given, else
        "default"."""
        if name is not None:
            if name not in self.templates:
                raise ChatTemplateError(f"{self.where}: no chat template named {name!r} "
                                        f"(have {', '.join(sorted(self.templates))})")
            return self.templates[name]
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" not in self.templates:
            raise ChatTemplateError(f"{self.where}: several chat templates and no 'default'; name one "
                                    f"(have {', '.join(sorted(self.templates))})")
        return self.templates["default"]

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False, tools=None, documents=None,
               template: str | None = None, **kwargs) -> str:
        """The text of the conversation, as transformers' `apply_chat_template(..., tokenize=False)`."""
        try:
            return self.select(template, tools).render(
                messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                **{**self.specials, **kwargs})
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
            raise ChatTemplateError(f"chat template ({self.where}): {e}") from None


# ---------------------------------------------------------------------------------------------
# Messages in, token ids out

def normalize(messages) -> list[dict]:
    """Messages as templates take them: dicts with a string `role`, None values dropped, reasoning aliased."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("content"), str) and "tool_calls" not in m:
            raise ChatTemplateError(f"messages[{i}] must have a string 'content' (or 'tool_calls')")
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _controls(tok) -> tuple[re.Pattern, re.Pattern]:
    """(a control token, and: a marked control token | a lone marker | a control token) for `tok`."""
    return _patterns(tuple(sorted(tok.special, key=len, reverse=True)))


@functools.lru_cache(maxsize=8)
def _patterns(names: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    any_tok = "|".join(map(re.escape, names)) or "(?!)"
    return re.compile(any_tok), re.compile(f"{MARK_START}(?P<marked>{any_tok}){MARK_END}|[{MARK_START}{MARK_END}]"
                                           f"|(?P<special>{any_tok})")


def mark(obj, control: re.Pattern):
    """User strings with their control tokens wrapped in markers (they stay text when encoded)."""
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return control.sub(lambda m: MARK_START + m.group(0) + MARK_END, obj)
    if isinstance(obj, dict):
        return {k: mark(v, control) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark(v, control) for v in obj]
    return obj


def encode_rendered(tok, text: str, cuts=()) -> tuple[list[int], list[int]]:
    """(ids, the offset in `text` where each id's piece starts) of a rendered, marked chat: the template's control
    tokens are special ids, marked ones text; text is also split at `cuts` (span boundaries)."""
    _, pieces = _controls(tok)
    ids, starts, pos = [], [], 0
    cuts = sorted(set(cuts))

    def text_piece(a, b):
        bounds = [a, *(c for c in cuts if a < c < b), b]
        for s, e in zip(bounds, bounds[1:]):
            new = tok.encode(text[s:e])
            ids.extend(new)
            starts.extend([s] * len(new))

    for m in pieces.finditer(text):
        text_piece(pos, m.start())
        if m.group("marked") is not None:
            new = tok.encode(m.group("marked"))
            ids.extend(new)
            starts.extend([m.start()] * len(new))
        elif m.group("special") is not None:
            ids.append(tok.special[m.group("special")])
            starts.append(m.start())
        pos = m.end()
    text_piece(pos, len(text))
    return ids, starts


def chat_ids(tok, template: ChatTemplate, messages, *, add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """The prompt tokens of a conversation (transformers' `apply_chat_template(..., tokenize=True)`)."""
    control, _ = _controls(tok)
    msgs = mark(normalize(messages), control)
    kwargs = mark(kwargs, control)
    return encode_rendered(tok, template.render(msgs, add_generation_prompt=add_generation_prompt, **kwargs))[0]


def assistant_spans(template: ChatTemplate, msgs: list[dict], text: str, stops: list[str], **kwargs):
    """[start, end) in `text` (the whole conversation rendered) of each assistant turn's content and end token.

    Turn i starts where `messages[:i]` rendered with the generation prompt ends, and ends where
    `messages[:i+1]` rendered ends, cut after its last stop token ("<|im_end|>\\n" keeps "<|im_end|>"). Both
    renders must be prefixes of the whole: a template that renders earlier turns differently once later ones
    follow (e.g. dropping earlier reasoning) gives no consistent mask, and is refused."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = template.render(msgs[:i], add_generation_prompt=True, **kwargs)
        turn = template.render(msgs[:i + 1], **kwargs)
        if not (text.startswith(turn) and turn.startswith(head)):
            raise ChatTemplateError(f"chat template ({template.where}): messages[:{i}] rendered with the generation "
                                    f"prompt is not a prefix of the conversation; cannot tell which tokens are "
                                    f"messages[{i}]'s")
        body = turn[len(head):]
        last = max((body.rfind(s) + len(s) for s in stops if s in body), default=len(body))
        spans.append((len(head), len(head) + last))
    return spans


def chat_document(tok, template: ChatTemplate, messages, **kwargs) -> tuple[list[int], list[bool]]:
    """A training conversation: (ids, mask) with the mask True on exactly the assistant turns' content tokens
    and their end token."""
    control, _ = _controls(tok)
    msgs = mark(normalize(messages), control)
    kwargs = mark(kwargs, control)
    text = template.render(msgs, **kwargs)
    stops = [s for s in (*STOP_TOKENS, template.specials.get("eos_token")) if s and s in tok.special]
    spans = assistant_spans(template, msgs, text, stops, **kwargs)
    ids, starts = encode_rendered(tok, text, [c for span in spans for c in span])
    mask = [any(a <= s < b for a, b in spans) for s in starts]
    return ids, mask


def load(d: Path | None) -> ChatTemplate:
    """The checkpoint directory's template, else the built-in Llama 3.1 format."""
    found = ChatTemplate.from_dir(Path(d)) if d is not None and Path(d).is_dir() else None
    return found or ChatTemplate.builtin()
