"""`python -m eval.run --engine sglang` end to end against a stand-in SGLang server on localhost."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from eval_test_helpers import char_tokenizer

from eval import templates
from eval.run import main

ROWS = [
    {"id": "c0", "problem": "What is 6*7?", "answer": "42"},
    {"id": "c1", "problem": "What is 10/4?", "answer": "\\frac{5}{2}"},
]


@pytest.fixture()
def fake_sglang(tmp_path):
    tok = char_tokenizer(chat=True)
    tok.save_pretrained(tmp_path / "model")
    tpl = templates.get("qwen-math-boxed")
    # prompt ids -> response text: c0 right every time, c1 right only for even seeds
    table = {tuple(tpl.encode(r["problem"], tok)): r for r in ROWS}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.path == "/generate" and body["return_logprob"] is True
            out = []
            for ids, sp in zip(body["input_ids"], body["sampling_params"]):
                row = table[tuple(ids)]
                ans = "2.5" if row["id"] == "c1" and sp["sampling_seed"] % 2 else row["answer"]
                text = "Compute step by step. The final result is \\boxed{" + ans + "}"
                resp = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
                assert sp["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
                out.append(
                    {
                        "output_ids": resp,
                        "meta_info": {
                            "finish_reason": {"type": "stop", "matched": resp[-1]},
                            "output_token_logprobs": [[-0.1, t, None] for t in resp],
                        },
                    }
                )
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", tmp_path / "model"
    srv.shutdown()
    srv.server_close()


def test_cli_sglang_end_to_end(fake_sglang, tmp_path, capsys):
    url, model = fake_sglang
    bench = tmp_path / "cli_set.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    argv = [
        "--model",
        str(model),
        "--engine",
        "sglang",
        "--sglang-url",
        url,
        "--benchmarks",
        str(bench),
        "--n-samples",
        "4",
        "--temperature",
        "0.7",
        "--max-new-tokens",
        "128",
        "--grader-workers",
        "1",
        "--out",
        str(out),
    ]
    summary = main(argv)
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 8
    c1 = [r for r in recs if r["problem_id"] == "c1"]
    n_ok = sum(r["correct"] for r in c1)
    assert all(r["correct"] for r in recs if r["problem_id"] == "c0")
    assert all(r["extracted"] in ("\\frac{5}{2}", "2.5") for r in c1)  # 2.5 == 5/2: graded equal either way
    assert n_ok == 4
    assert summary["scores"] == {"cli_set": 1.0} and summary["template"] == "qwen-math-boxed"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["avg"] == 1.0 and saved["engine"] == "sglang" and saved["n_samples"] == 4
    assert "average" in capsys.readouterr().out
    main(argv)  # rerun: complete, nothing regenerated, same summary
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8


def test_cli_needs_url(tmp_path, fake_sglang):
    _, model = fake_sglang
    with pytest.raises(SystemExit, match="--rollout-url"):
        main(["--model", str(model), "--engine", "sglang", "--benchmarks", "aime24", "--out", str(tmp_path / "o")])


@pytest.fixture()
def no_engine(monkeypatch):
    """Fail the test if main() gets as far as loading a tokenizer (the first step of building an engine)."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("a tokenizer/engine was built for a bad --model path")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)


@pytest.mark.parametrize("engine", ["hf", "sglang"])
def test_cli_missing_model_dir_is_one_clear_line(tmp_path, capsys, no_engine, engine):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--model",
                str(missing),
                "--engine",
                engine,
                "--sglang-url",
                "http://127.0.0.1:1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    msg = str(e.value.code)  # SystemExit(str): printed on stderr by the interpreter, exit status 1
    assert e.value.code != 0 and "\n" not in msg
    assert str(missing) in msg and "no such directory" in msg and "config.json" in msg
    assert not (tmp_path / "o").exists()
    assert "Traceback" not in capsys.readouterr().err


def test_cli_model_dir_without_config_is_refused(tmp_path, no_engine):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model), "--engine", "hf", "--out", str(tmp_path / "o")])
    msg = str(e.value.code)
    assert "\n" not in msg and str(model) in msg and "config.json" in msg and "model.safetensors" in msg
    with pytest.raises(SystemExit, match="got a file"):
        main(["--model", str(model / "model.safetensors"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_cli_model_path_subprocess_exit_status(tmp_path):
    """What a user sees from `python -m eval.run --model /no/such/dir`: one line on stderr, exit 1."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "eval.run", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no such directory" in r.stderr, r.stderr
