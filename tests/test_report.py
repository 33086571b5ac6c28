"""`alignkit report`: real run directories of tiny-model commands (sft, rm, two PPO runs at two
β, rest-em with two iterations, best-of-n) rendered into one self-contained HTML page and a
Markdown version; then the page opened in headless Chromium (Playwright): every image loads, the
page logs no console error and asks for nothing outside the file.

The browser test skips, saying why, when Playwright or Chromium is missing (CI installs both
when it can); every other check runs without them."""

import base64
import json
import re
import shutil
from html import escape
from pathlib import Path

import pytest
import torch

from alignkit.algorithms.sampling.stages import Sample, tokenize_samples
from alignkit.algorithms.sampling.train_stage import train_stage
from alignkit.cli import main as cli_main
from alignkit.engine.config import SamplingTrainConfig
from alignkit.models.load import save_model
from alignkit.models.tiny import save_tiny, tiny_model, tiny_tokenizer
from alignkit.report.collect import read_run
from alignkit.report.command import main as report
from alignkit.tasks import RewardConfig, TaskConfig, build_task

FAST = ["train.threads=1", "train.progress=false"]
TASK = ["task.min_digits=1", "task.max_digits=1", "task.ops=[+]", "task.train=8", "task.val=2", "task.heldout=4"]
SECTIONS = ["runs", "training", "reward-vs-kl", "best-of-n", "reward-model", "iterations", "samples"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run(args):
    assert cli_main(args) == 0, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories made by the commands themselves on tiny models (~15 s on one thread)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("report-runs")
    tiny = save_tiny(str(out / "tiny"))
    # a tiny model taught the answer format on one-digit sums, so that ReST-EM keeps some samples
    tok, model = tiny_tokenizer(), tiny_model(seed=0)
    task = build_task(TaskConfig(train=40, val=4, heldout=8, min_digits=1, max_digits=1, ops=["+"]), RewardConfig())
    data = tokenize_samples(tok, [Sample(p, task.answer_for(p)) for p in task.train])
    teach = SamplingTrainConfig(output_dir=str(out / "teach"), lr=3e-3, epochs=40, max_tokens_per_batch=512, progress=False,
                                warmup_ratio=0.05)
    answering = str(save_model(train_stage(model, tok, data, teach)[0], tok, out / "answering"))
    dirs = {name: out / name for name in ("sft", "rm", "ppo-beta-0.05", "ppo-beta-0.2", "rest-em", "bon")}
    run(["sft", *FAST, f"model.path={tiny}", "data.max_length=64", "train.max_steps=3", "data.mixture.examples_per_task=3",
         "data.mixture.cap=3", "eval.problems=2", "eval.max_new_tokens=2", "eval.batch_size=2", f"train.output_dir={dirs['sft']}"])
    run(["rm", *FAST, f"model.path={tiny}", "train.max_steps=2", "data.builtin_pairs=8", "data.builtin_eval_pairs=8",
         f"train.output_dir={dirs['rm']}"])
    for beta in ("0.05", "0.2"):
        run(["ppo", "train.threads=1", f"model.path={tiny}", "iterations=2", "prompts_per_iteration=2", "minibatch_size=2",
             "sampling.max_new_tokens=3", "ppo_epochs=1", "prompts.train=4", "prompts.heldout=2", "train.batch_size=1",
             f"kl.beta={beta}", f"train.output_dir={dirs[f'ppo-beta-{beta}']}"])
    run(["rest-em", f"model.path={answering}", *FAST, *TASK, "train.lr=1e-3", "train.epochs=1", "iterations=2",
         "stop_when_worse=false", "sampling.max_new_tokens=4", "sampling.n=4", "metrics.train_problems=4",
         "metrics.eval_samples=4", "metrics.ks=[1,2,4]", "metrics.baseline_samples=true", "train.max_tokens_per_batch=512",
         f"train.output_dir={dirs['rest-em']}"])
    run(["best-of-n", f"model.path={answering}", "task.source=arithmetic", "task.heldout=4", "ns=[1,2]", "sampling.n=4",
         "sampling.temperature=0.7", "temperatures=[1.3]", "sampling.max_new_tokens=4", "threads=1", f"output_dir={dirs['bon']}"])
    return dirs


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory):
    """The report of every run: (html path, markdown path, html text)."""
    out = tmp_path_factory.mktemp("report")
    html, md = out / "report.html", out / "report.md"
    assert report([str(p) for p in runs.values()] + ["-o", str(html), "--markdown", str(md)]) == 0
    return html, md, html.read_text()


def _images(text: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)


def test_the_runs_read_as_their_commands(runs):
    kinds = {name: read_run(path).kind for name, path in runs.items()}
    assert kinds == {"sft": "sft", "rm": "rm", "ppo-beta-0.05": "ppo", "ppo-beta-0.2": "ppo", "rest-em": "rest-em",
                     "bon": "best-of-n"}
    rest = read_run(runs["rest-em"])
    assert sorted(rest.stages) == ["iter-1", "iter-2"] and sorted(rest.iteration_samples) == [1, 2]
    assert [r["iteration"] for r in rest.iteration_rows()] == [0, 1, 2]
    assert read_run(runs["ppo-beta-0.2"]).beta() == pytest.approx(0.2)


def test_html_is_self_contained_with_every_section(page):
    _, _, text = page
    for section in SECTIONS:
        assert f'<section id="{section}">' in text, section
    sources = _images(text)
    # training curves, train stages, reward vs KL, best of N, reward model, ReST-EM's iterations
    assert len(sources) == 6
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://", text) and "<script" not in text and "<link" not in text
    assert not re.search(r"\b(?:src|href)=\"(?!data:|#)", text)  # nothing but inlined images and anchors
    # the frontier table: one row per PPO run with its β; the ReST-EM table; RM accuracy by rating
    frontier = text[text.index('<section id="reward-vs-kl">'):text.index('<section id="best-of-n">')]
    assert "<td>ppo-beta-0.05</td><td>ppo</td><td>0.05</td>" in frontier and "<td>ppo-beta-0.2</td><td>ppo</td><td>0.2</td>" in frontier
    assert "<th>pass@4</th>" in text and "<th>significantly better</th>" in text and "<th>iteration 2</th>" in text


def test_markdown_writes_tables_and_figures_beside_it(page):
    _, md_path, _ = page
    text = md_path.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) == 6
    for rel in figures:
        assert rel.startswith("report_files/") and (md_path.parent / rel).read_bytes()[:4] == b"\x89PNG"
    assert "## Reward vs KL" in text and "| run | command | β | KL (nats) | reward |" in text
    assert "| T | N | KL bound | max reward | median reward |" in text


def test_sections_follow_the_data(runs, tmp_path):
    out = tmp_path / "sft.html"
    assert report([str(runs["sft"]), "-o", str(out)]) == 0
    text = out.read_text()
    present = [s for s in SECTIONS if f'<section id="{s}">' in text]
    assert present == ["runs", "training", "samples"]  # no KL, no best of N, no reward model, no iterations
    assert len(_images(text)) == 1


def test_without_matplotlib_the_report_has_tables_only(runs, tmp_path, monkeypatch):
    from alignkit.report import plots

    monkeypatch.setattr(plots, "pyplot", lambda: None)
    out, md = tmp_path / "r.html", tmp_path / "r.md"
    assert report([str(runs["rest-em"]), str(runs["bon"]), "-o", str(out), "--markdown", str(md)]) == 0
    text = out.read_text()
    assert "<img" not in text and escape(plots.NO_MATPLOTLIB) in text and not (tmp_path / "r_files").exists()
    assert "<th>pass@4</th>" in text and "<th>max reward</th>" in text  # the tables stay


def test_frontier_takes_each_runs_last_evaluation_and_its_beta(tmp_path):
    """DPO-style runs that logged eval/reward and eval/kl, their β in the config they wrote: one
    point each, from the last evaluation; a model's config.json (model_type) is no run config."""
    for name, beta, points in (("dpo-a", 0.1, [(0.5, 1.0), (2.0, 1.5)]), ("dpo-b", 0.5, [(0.2, 0.4), (0.8, 0.9)])):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s + 1, "loss": 0.7 - 0.1 * s} for s in range(2)]
        rows += [{"step": s + 1, "eval/kl": kl, "eval/reward": r} for s, (kl, r) in enumerate(points)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "config.json").write_text(json.dumps({"beta": beta, "train": {"lr": 1e-6}}))
    model_config = tmp_path / "sft"
    model_config.mkdir()
    (model_config / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (model_config / "config.json").write_text(json.dumps({"model_type": "llama", "beta": 9}))
    assert read_run(model_config).config is None and read_run(model_config).beta() is None
    out = tmp_path / "r.html"
    assert report([str(tmp_path / "dpo-a"), str(tmp_path / "dpo-b"), str(model_config), "-o", str(out)]) == 0
    text = out.read_text()
    assert "<tr><td>dpo-a</td><td>sft</td><td>0.1</td><td>2</td><td>1.5</td></tr>" in text
    assert "<tr><td>dpo-b</td><td>sft</td><td>0.5</td><td>0.8</td><td>0.9</td></tr>" in text
    assert "<td>sft</td><td>sft</td>" not in text.split('<section id="reward-vs-kl">')[1]
    assert "<summary>dpo-a: config</summary>" in text


def test_a_directory_without_metrics_is_an_error_naming_it(tmp_path, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello\n")
    assert report([str(empty), "-o", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: no metrics.jsonl" in err and not (tmp_path / "r.html").exists()
    assert report([str(tmp_path / "missing"), "-o", str(tmp_path / "r.html")]) == 1
    assert f"{tmp_path / 'missing'}: no such run directory" in capsys.readouterr().err
    assert report(["-o", str(tmp_path / "r.html")]) == 2  # no run directory: argparse's usage error
    assert "RUN_DIR" in capsys.readouterr().err
    assert report(["--help"]) == 0 and "--markdown" in capsys.readouterr().out


def test_a_broken_metrics_line_names_the_file(tmp_path, capsys):
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{oops\n" + json.dumps({"step": 2}) + "\n")
    assert report([str(bad), "-o", str(tmp_path / "r.html")]) == 1
    assert f"{bad / 'metrics.jsonl'}:2: not a JSON object" in capsys.readouterr().err


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright): the page is not opened in a browser")
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).is_file():
        pytest.skip("no Chromium found (apt-get install chromium): the page is not opened in a browser")
    return exe


def test_the_page_renders_in_headless_chromium(page, tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    html_path = page[0]
    errors, requests = [], []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=exe, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        try:
            tab = context.new_page()
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(html_path.as_uri(), wait_until="load")
            images = tab.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            titles = tab.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
            tab.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            context.close()
    assert len(images) == 6 and all(done and w > 0 and h > 0 for done, w, h in images), images
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert titles == ["Runs", "Training curves", "Reward vs KL", "Best of N", "Reward model", "Iterations", "Sample replies"]
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
