"""The Python examples in README.md and docs/ run as written and print what the docs say.

A ```` ```python ```` block followed directly by an ```` ```output ```` block states what
the block prints; the test compares it with what the block really prints (lines stripped
of trailing spaces). In the stated output ``...`` stands for any text, lines included (as
doctest's ELLIPSIS). A block whose figures vary between machines or runs (random weights,
timings, dates) is fenced ```` ```output figures-vary ````: there each number and each
True/False of the stated output matches any number / any of True and False, so the test
checks the shape of the output and its words. A block that prints must state its output;
blocks that print nothing only run. Relative links and their anchors must resolve.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_BLOCK = re.compile(r"```python\n(.*?)```(?:\s*```output( figures-vary)?\n(.*?)```)?", re.S)
_FIGURE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?|\b(?:True|False)\b")


def _blocks(path: Path) -> list[tuple[str, str | None, bool]]:
    """(code, stated output or None, whether its figures vary), in page order."""
    return [(m[1], m[3], bool(m[2])) for m in _BLOCK.finditer(path.read_text())]


def _pattern(stated: str, vary: bool) -> re.Pattern[str]:
    """The stated output as a regex: ``...`` any text, figures any figure if they vary."""

    def literal(text: str) -> str:
        if not vary:
            return re.escape(text)
        out, at = [], 0
        for m in _FIGURE.finditer(text):
            out.append(re.escape(text[at : m.start()]))
            word = m.group()
            out.append(
                r"(?:True|False)"
                if word in ("True", "False")
                else r"-?(?:[\d,.]+(?:e[-+]?\d+)?|nan|inf)"
            )
            at = m.end()
        out.append(re.escape(text[at:]))
        return "".join(out)

    return re.compile(".*?".join(literal(part) for part in _strip(stated).split("...")), re.S)


def _strip(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("doc", [d for d in DOCS if _blocks(d)], ids=lambda d: d.name)
def test_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for n, (code, stated, vary) in enumerate(_blocks(doc)):
        printed = io.StringIO()  # blocks of one page share state, like a reader's session
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{doc.name}", "exec"), namespace)
        if stated is None:
            continue
        real = _strip(printed.getvalue())
        assert _pattern(stated, vary).fullmatch(real), (
            f"{doc.name}, example {n + 1}: the docs say it prints\n{_strip(stated)}\n"
            f"but it printed\n{real}"
        )


def test_stated_output_is_checked():
    """The comparison itself: a wrong word or figure fails, ``...`` and varying figures pass."""
    assert _pattern("a 3 b\n...\nend", vary=False).fullmatch("a 3 b\nx\ny\nend")
    assert not _pattern("a 3 b", vary=False).fullmatch("a 4 b")
    assert _pattern("unit 5: 1.25 (2, 3) True", vary=True).fullmatch("unit 12: -0.5 (0, 1) False")
    assert not _pattern("unit 5: 1.25", vary=True).fullmatch("units 5: 1.25")
    assert not _pattern("unit 5", vary=True).fullmatch("unit x")


def _unstated(path: Path) -> list[str]:
    """The first line of each block of a page that prints but states no output."""
    return [
        code.strip().splitlines()[0]
        for code, stated, _ in _blocks(path)
        if stated is None and re.search(r"\bprint\(", code)
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_examples_that_print_state_what_they_print(doc: Path):
    """A block that prints is followed by the output it prints, so the test above compares
    it: docs/tracing.md stated `lin.target, lin.args` and a hooked run's shape in comments
    (the shape as `(2, 4, 12, 12)`, where the block prints `torch.Size([2, 4, 12, 12])`),
    which nothing checked."""
    assert not _unstated(doc), (
        f"{doc.name}: blocks that print without an ```output block after them, "
        f"starting: {_unstated(doc)}"
    )


def test_unstated_output_is_found(tmp_path: Path):
    """The check itself: a printing block without an output block is found, one with an
    output block and one that prints nothing are not."""
    page = tmp_path / "page.md"
    fence = "```"
    page.write_text(
        f"{fence}python\nx = 1\nprint(x)  # 1\n{fence}\n\n"
        f"{fence}python\nprint(2)\n{fence}\n\n{fence}output\n2\n{fence}\n\n"
        f"{fence}python\ny = 3\n{fence}\n"
    )
    assert _unstated(page) == ["x = 1"]


# --- links between the pages ---

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """The anchors of a page as GitHub makes them: each heading's slug (lower case,
    punctuation dropped, spaces as hyphens, a repeated slug numbered) and each
    ``<a id="...">``."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    slugs: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.*?) *#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n, candidate = 0, slug
        while candidate in slugs:
            n += 1
            candidate = f"{slug}-{n}"
        slugs.add(candidate)
    return slugs | set(re.findall(r'<a id="([^"]+)"', text))


def _broken_links(path: Path) -> list[str]:
    """The relative links of a page whose file or anchor does not exist."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for link in _LINK.findall(text):
        if re.match(r"[a-z]+:", link):
            continue  # http:, https:, mailto:
        file, _, anchor = link.partition("#")
        target = (path.parent / file).resolve() if file else path
        if not target.exists() or (
            anchor and target.suffix == ".md" and anchor not in _anchors(target)
        ):
            broken.append(link)
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_between_pages_resolve(doc: Path):
    """Every relative link of README.md and docs/ names a file that exists and, with
    ``#anchor``, a heading or ``<a id>`` of that page: a renamed heading breaks no link
    silently."""
    assert not _broken_links(doc), f"{doc.name}: broken links {_broken_links(doc)}"


def test_broken_links_are_found(tmp_path: Path):
    """The check itself: a missing file or anchor is found; a heading's slug, a repeated
    heading's numbered slug, an ``<a id>`` and a web address are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## In a notebook\n\n## In a notebook\n")
    page = tmp_path / "page.md"
    page.write_text(
        '<a id="here"></a>\n# Page: `x.y`\n'
        "[a](other.md#in-a-notebook) [b](other.md#in-a-notebook-1) [c](#here) [d](#page-xy) "
        "[e](https://example.com/x#y) [f](missing.md) [g](other.md#nowhere) [h](#gone)\n"
    )
    assert _broken_links(page) == ["missing.md", "other.md#nowhere", "#gone"]


# --- the `lurker` command lines of the docs' shell blocks and of the commands' --help ---

_SHELL = re.compile(r"```(?:sh|bash)\n(.*?)```", re.S)
#: commands whose first argument is a run directory (explain and featviz: a run or a spec)
_READS_A_RUN = {"images", "render", "serve", "export", "map", "explain", "featviz"}


def _commands(text: str) -> list[list[str]]:
    """Each ``lurker ...`` line (backslash continuations joined, comments dropped), split as
    the shell splits it; ``torchrun ... -m lurker.cli`` counts as ``lurker``."""
    import shlex

    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "lurker.cli" in words:
            words = ["lurker", *words[words.index("lurker.cli") + 1 :]]
        if words[:1] == ["lurker"] and "..." not in words and "MODEL|RUN" not in words:
            out.append(words[1:])
    return out


def _doc_commands() -> list[tuple[str, list[str]]]:
    return [
        (doc.name, words)
        for doc in DOCS
        for block in _SHELL.findall(doc.read_text())
        for words in _commands(block)
    ]


def _help_commands() -> list[tuple[str, list[str]]]:
    from lurker.cli import main

    return [
        (f"lurker {name} --help", words)
        for name, command in main.commands.items()
        for words in _commands(command.epilog or "")
    ]


def _parse(words: list[str]) -> None:
    """Parse a command line as ``lurker`` would, without running it: an unknown command or
    option, a missing option value, an extra argument or a value of the wrong type
    (--steps abc) raises click's usage error."""
    import click

    from lurker.cli import main

    name, args = words[0], words[1:]
    assert name in main.commands, f"no command {name!r}"
    command = main.commands[name]
    # click's own parser: unknown options and missing values raise, surplus arguments are
    # left over; no callbacks and no file checks run (the paths are the reader's)
    ctx = click.Context(command, info_name=name)
    values, rest, _ = command.make_parser(ctx).parse_args(args=list(args))
    if rest:
        raise click.UsageError(f"unexpected extra arguments {rest}")
    for param in command.params:
        value = values.get(param.name)
        if value is None or isinstance(param.type, click.Path):
            continue
        if isinstance(param, click.Option) and (param.is_flag or param.count):
            continue
        for v in value if param.multiple else [value]:
            param.type.convert(v, param, ctx)


def test_documented_command_lines_parse():
    """Every ``lurker`` command line in README.md's and docs/'s shell blocks and in the
    commands' --help examples names options that exist, with values of their types: the
    docs and --help cannot drift from the command (a renamed option, a removed one)."""
    import click

    lines = _doc_commands() + _help_commands()
    names = {words[0] for _, words in lines}
    assert {"trace", "probe", "images", "explain", "featviz", "map", "serve", "export"} <= names
    for where, words in lines:
        try:
            _parse(words)
        except (click.UsageError, AssertionError) as e:
            raise AssertionError(f"{where}: `lurker {' '.join(words)}`: {e}") from None


def test_documented_command_lines_parse_is_checked():
    """The check itself: an unknown option, a bad value and a surplus argument fail."""
    import click

    for bad in (
        ["featviz", "demo-out/run", "--layers", "features.8"],
        ["featviz", "demo-out/run", "--layer", "features.8", "--steps", "many"],
        ["export", "demo-out/run", "site/", "more/"],
        ["explore", "demo-out/run"],
    ):
        with pytest.raises((click.UsageError, AssertionError)):
            _parse(bad)
    _parse(["featviz", "demo-out/run", "--layer", "features.8", "--units", "0-7"])


def _run_dirs(doc: str) -> tuple[set[str], list[str]]:
    """The run folders a page's commands make (`lurker probe --out`) and those they read."""
    made, read = {"demo-out/run"}, []  # `make demo`, which the README starts with, makes one
    for name, words in _doc_commands():
        if name != doc:
            continue
        if words[0] == "probe":
            made.add(words[words.index("--out") + 1])
            continue
        first = next((w for w in words[1:] if not w.startswith("-")), "")
        if words[0] in _READS_A_RUN and "/" in first and ":" not in first:
            read.append(first)
    return made, read


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_runs_the_docs_read_are_made_where_a_reader_finds_them(doc: str):
    """A page that reads a run (`lurker featviz runs/digits`) makes it on the same page or
    reads the demo's (`demo-out/run`): README.md's featviz line read a `runs/digits` that
    nothing a README reader runs makes, and docs/explain.md precomputed explanations of it,
    which the command refuses for a run made from Python (docs/probe.md's `runs/digits`).
    A folder of runs (`runs/`) and a run served with its model given are anyone's."""
    made, read = _run_dirs(doc)
    for words in (w for n, w in _doc_commands() if n == doc):
        if words[0] == "serve" and "--model" in words:
            read = [r for r in read if r not in words]
    missing = [r for r in read if r not in made and not r.endswith("/")]
    assert not missing, f"{doc} reads runs none of its commands make: {missing} (made: {made})"


def test_explain_command_line_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """docs/explain.md's `lurker explain` examples run as written, given the files they
    name (the weights `make demo` writes, an image): each writes its heatmap."""
    import torch
    import torchvision
    from click.testing import CliRunner
    from PIL import Image

    from lurker.cli import main
    from lurker.examples import DigitsNet

    monkeypatch.chdir(tmp_path)
    Path("demo-out").mkdir()
    torch.save(DigitsNet().state_dict(), "demo-out/digits_net.pt")  # what `make demo` leaves
    torch.save(torchvision.models.resnet18().state_dict(), "resnet18.pt")
    Image.new("RGB", (40, 32), (200, 90, 30)).save("cat.jpg")
    Image.new("L", (16, 16), 128).save("7.png")
    doc = (ROOT / "docs" / "explain.md").read_text()
    lines = [words for block in _SHELL.findall(doc) for words in _commands(block)]
    lines = [words for words in lines if words[0] == "explain"]
    assert len(lines) == 2
    for words in lines:
        r = CliRunner().invoke(main, words)
        assert r.exit_code == 0, f"lurker {' '.join(words)}\n{r.output}"
        out = words[words.index("--out") + 1] if "--out" in words else "heat.png"
        method = words[words.index("--method") + 1]
        assert f"{method} of class " in r.output and Image.open(out).size[0] > 0


# --- docs/explorer.md's JSON API tables against the server's response models ---

_ENDPOINT = re.compile(r"^\| `(GET|POST) ([^`]+)`[^|]*\| (.*) \|$", re.M)


def _keys(text: str) -> dict[str, object]:
    """The keys of the ``{a, b: {c, d}, e: [{f}], g (a note)}`` that ``text`` starts with,
    each mapped to its own documented keys (a dict) or None; notes in parentheses and the
    values of ``key: "value"`` are skipped."""
    assert text.startswith("{"), text
    keys: dict[str, object] = {}
    depth, parens, piece = 0, 0, ""
    for ch in text[1:]:
        if ch in "()":
            parens += 1 if ch == "(" else -1
        elif parens:
            continue
        elif depth == 0 and ch in ",}":
            _add_key(keys, piece)
            piece = ""
            if ch == "}":
                break
        else:
            depth += (ch in "{[") - (ch in "}]")
            piece += ch
    return keys


def _add_key(keys: dict[str, object], piece: str) -> None:
    m = re.match(r"\s*(\w+)\s*:?\s*(.*)", piece, re.S)
    if not m:
        return
    name, rest = m[1], m[2].strip()
    rest = rest.lstrip("[")
    keys[name] = _keys(rest) if rest.startswith("{") else None


def _api_rows() -> list[tuple[str, str, str]]:
    """(method, path, answer) of each row of the API tables, backticks dropped."""
    text = (ROOT / "docs" / "explorer.md").read_text()
    return [
        (method, path.split("?")[0], answer.replace("`", ""))
        for method, path, answer in _ENDPOINT.findall(text)
    ]


def _schema_keys(spec: dict, schema: dict) -> dict[str, object] | None:
    """The properties of an OpenAPI schema (following $ref, arrays and nullable unions),
    each mapped to its own; None where it is not an object with named properties."""
    if not isinstance(schema, dict):
        return None  # `true`: any value
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            return _schema_keys(spec, option)
    if "$ref" in schema:
        return _schema_keys(spec, spec["components"]["schemas"][schema["$ref"].split("/")[-1]])
    if schema.get("type") == "array":
        return _schema_keys(spec, schema.get("items", {}))
    if "properties" not in schema:
        return None
    return {k: _schema_keys(spec, v) for k, v in schema["properties"].items()}


#: JSON routes whose answer docs/explorer.md describes in prose or another document, not
#: as a key list (the graph's has its own schema, docs/explorer.md "Graph view document").
_KEYS_DOCUMENTED_ELSEWHERE = {("GET", "/api/runs/{}/graph")}

#: Nested objects a row may name bare (their keys are a command's or a store's own:
#: ``featviz`` entries, the run's ``additions`` tokens by kind, ...), as "METHOD path key".
_BARE_OBJECTS: set[str] = set()


def _key_mismatches(
    doc: dict[str, object], real: dict[str, object], where: str, answer: str = ""
) -> list[str]:
    """How ``doc`` (a row's documented keys) differs from ``real`` (the response model's),
    nested objects included. An object the braces name bare must be listed further on in
    ``answer`` as ``key {...}`` or ``key [{...}]`` (``key:`` too), or be a sibling's like
    (the unit's ``top.mean`` entries as ``top.max``'s), or be allowlisted."""
    for key, sub in list(doc.items()):
        if sub is None and isinstance(real.get(key), dict):
            m = re.search(rf"\b{key}:? \(?\[?(?=\{{)", answer)
            if m:
                doc[key] = _keys(answer[m.end() :])
    out = []
    if set(doc) != set(real):
        out.append(
            f"{where}: documented {sorted(doc)}, answered {sorted(real)} "
            f"(undocumented {sorted(set(real) - set(doc))}, "
            f"not answered {sorted(set(doc) - set(real))})"
        )
    for key, sub in doc.items():
        obj = real.get(key)
        if isinstance(sub, dict) and isinstance(obj, dict):
            out += _key_mismatches(sub, obj, f"{where} {key}", answer)
        elif isinstance(obj, dict) and f"{where} {key}" not in _BARE_OBJECTS:
            like = [k for k, v in doc.items() if isinstance(v, dict) and real.get(k) == obj]
            if not like:
                out.append(f"{where} {key}: an object of {sorted(obj)}, documented bare")
    return out


def test_api_tables_name_the_keys_the_server_answers(tmp_path: Path):
    """Each API row of docs/explorer.md that lists its document's keys lists exactly the
    keys of the route's response model, nested objects included: the run manifest's `holds`
    listed 7 of its 10 keys (not `featviz`, which the featviz row sends readers to, nor
    `relevance`, `explained`), `dataset` lacked `features`, the map lacked `outputs` and
    `comparable`, the methods list `concepts`, the layer document its `featviz_*` and
    `top_max_tokens*` keys, an op's document `kind`, and the unit document named its
    top-k lists as `max` and `mean` (numbers; the lists are under `top`)."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import lurker
    from lurker.server import create_app

    data = TensorDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    lurker.probe(model.eval(), data, out=tmp_path / "run", k=2, progress=False)
    spec = create_app(tmp_path / "run", live=False).openapi()
    routes = {}
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op["responses"].get("200", {}).get("content", {}).get("application/json")
            if body:
                routes[(method.upper(), re.sub(r"\{\w+\}", "{}", path))] = body["schema"]
    rows = _api_rows()
    assert len(rows) >= 28
    problems = []
    listed: set[tuple[str, str]] = set()
    for method, path, answer in rows:
        doc_path = re.sub(r"\{\w+\}", "{}", path)
        found = [
            schema
            for (m, p), schema in routes.items()
            if m == method
            and (p == doc_path or (path.startswith("...") and p.endswith(doc_path[3:])))
        ]
        if not found and not answer.startswith("{"):
            continue  # an image, a file: no JSON route
        assert len(found) == 1, f"{method} {path}: {len(found)} routes match"
        real = _schema_keys(spec, found[0])
        if real is None or not answer.startswith("{"):
            continue  # not an object; or listed in prose: the route is reported below
        listed |= {(m, p) for (m, p), schema in routes.items() if schema is found[0]}
        problems += _key_mismatches(_keys(answer), real, f"{method} {path}", answer)
    for (method, path), schema in routes.items():
        if _schema_keys(spec, schema) and (method, path) not in listed | _KEYS_DOCUMENTED_ELSEWHERE:
            problems.append(f"{method} {path}: answers an object, and no API row lists its keys")
    assert not problems, "\n".join(problems)


def test_api_keys_are_read_from_the_docs():
    """The parser itself: nested objects and lists of objects are read, notes are not."""
    assert _keys("{a, b: {c, d} (note, with, commas), e: [{f, g}], h (x: {y})}: more {z}") == {
        "a": None,
        "b": {"c": None, "d": None},
        "e": {"f": None, "g": None},
        "h": None,
    }
    assert _keys('{target: "top", samples: [{image}]}') == {
        "target": None,
        "samples": {"image": None},
    }


def test_map_page_lists_the_map_documents_keys():
    """docs/map.md's API paragraph lists the keys of `GET /api/runs/{run}/map` as
    docs/explorer.md's row does (which test_api_tables_name_the_keys_the_server_answers
    checks against the server): it lacked `outputs` and `comparable`."""
    text = (ROOT / "docs" / "map.md").read_text()
    m = re.search(r"`GET /api/runs/\{run\}/map` answers[^`]*`(\{[^`]*\})`", text)
    assert m, "docs/map.md no longer lists the map document's keys"
    row = [a for method, path, a in _api_rows() if (method, path) == ("GET", "/api/runs/{run}/map")]
    assert len(row) == 1
    assert _keys(" ".join(m[1].split())) == _keys(row[0])


def test_trace_command_line_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The `lurker trace` lines of README.md and docs/ whose model ships with torchvision or
    lurker run as written (given the weights `make demo` leaves) and print what
    docs/tracing.md says the command prints: the summary, the validation line, the
    `non-finite:` line, and the files it wrote."""
    import torch
    from click.testing import CliRunner

    from lurker.cli import main
    from lurker.examples import DigitsNet

    monkeypatch.chdir(tmp_path)
    Path("demo-out").mkdir()
    torch.save(DigitsNet().state_dict(), "demo-out/digits_net.pt")
    lines = [w for _, w in _doc_commands() if w[0] == "trace"]
    runnable = [w for w in lines if w[1].split(":")[0] in ("torchvision", "lurker.examples")]
    assert len(runnable) >= 4 and len(lines) - len(runnable) == 1  # path/to/model.py
    for words in runnable:
        r = CliRunner().invoke(main, words)
        assert r.exit_code == 0, f"lurker {' '.join(words)}\n{r.output}"
        out = words[words.index("--out") + 1] if "--out" in words else "graph.svg"
        assert "Ops:" in r.output and "validation:" in r.output, r.output
        assert "non-finite: none" in r.output and f"graph: {out}" in r.output, r.output
        assert Path(out).stat().st_size > 0
        if "--json" in words:
            assert Path(words[words.index("--json") + 1]).stat().st_size > 0
