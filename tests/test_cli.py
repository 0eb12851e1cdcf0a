"`specdec generate/bench --help` keep the spec registry's lines; `specdec bench` flags are typed from the notebook's parameters cell."
import argparse, contextlib, io, re
import pytest
from specdec import specs
from specdec.cli import main, add_parameter_flags, bench_notebook, LinesHelpFormatter
from specdec.parameters import notebook_parameters


def help_of(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit): main([*argv, "--help"])
    return out.getvalue()


def rows_kept(help:str, kind:str) -> bool:
    """Every form of the registry's help starts a line of `help` (a form wider than the terminal goes on over the next
    lines, broken only before a `[`), its description next: after it on that line or starting the line below."""
    rows = [re.match(r"\s*(\S.*?)\s{2,}(\S.*)$", r).groups() for r in specs.help_text(kind).splitlines()]
    lines = []
    for l in (l.strip() for l in help.splitlines()):
        if l.startswith("[") and lines: lines[-1] += l                   # a long form, continued
        else: lines.append(l)
    def kept(form, desc):
        return any(l.startswith(form) and (l[len(form):] or nxt).split()[:1] == desc.split()[:1]
                   for l, nxt in zip(lines, lines[1:] + [""]))
    return all(kept(form, desc) for form, desc in rows)


@pytest.mark.parametrize("columns", ["80", "160"])
def test_help_keeps_one_line_per_form(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    generate, bench = help_of("generate"), help_of("bench")
    for kind in ("drafter", "controller", "policy"): assert rows_kept(generate, kind), kind
    for kind in ("drafter", "controller", "policy"): assert rows_kept(bench, kind), kind
    assert "none | none" not in generate                                   # the drafter help names `none` once
    options = generate.split("options:")[1].splitlines()
    assert max(len(l) for l in options) <= int(columns) - 2                 # still wrapped to the terminal


def test_argparse_default_formatter_would_flatten_them(monkeypatch):
    "The negative control: the same flags under argparse's own formatter lose the rows."
    monkeypatch.setenv("COLUMNS", "160")
    plain, lines = argparse.ArgumentParser(), argparse.ArgumentParser(formatter_class=LinesHelpFormatter)
    for p in (plain, lines): add_parameter_flags(p, notebook_parameters(bench_notebook()))
    assert rows_kept(lines.format_help(), "drafter") and not rows_kept(plain.format_help(), "drafter")


def parse_bench(*argv):
    p = argparse.ArgumentParser(prog="specdec bench", exit_on_error=False)
    add_parameter_flags(p, notebook_parameters(bench_notebook()))
    return p.parse_args(list(argv))


def test_bench_flags_are_typed_from_the_parameters_cell():
    a = parse_bench("--ks", "4", "--temperature", "1", "--max-new-tokens", "16", "--no-chat")
    assert (a.ks, a.temperature, a.max_new_tokens, a.chat) == ("4", 1.0, 16, False)   # ks is a str parameter
    assert isinstance(a.temperature, float) and a.drafters is None                     # not given: the notebook's default
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        main(["bench", "--max-new-tokens", "many"])
    assert "argument --max-new-tokens: parameter max_new_tokens is an int (the notebook's default: 48), got 'many'" in err.getvalue()


def test_generate_takes_a_batch_of_prompts():
    "`--prompt` given twice decodes a batch; each row prints the text that prompt prints alone."
    def run(*prompts):
        out = io.StringIO()
        argv = ["generate", "--model", "smollm2-135m", "--drafter", "pld", "--max-new-tokens", "12"]
        with contextlib.redirect_stdout(out): assert main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
        return out.getvalue()
    texts = ["Repeat: the quick brown fox.", "Name three colours."]
    alone = [run(t).split("\n\nmodel ")[0] for t in texts]
    batch = run(*texts)
    rows = re.findall(r"--- row (\d): 12 tokens, τ [\d.]+\n(.*?)(?=\n--- row|\n\nmodel )", batch, re.S)
    assert [int(b) for b, _ in rows] == [0, 1] and [t for _, t in rows] == alone
    assert "| batch of 2" in batch and alone[0] != alone[1]
