"""`python -m eval.run --engine sglang` end to end against a stand-in SGLang server on localhost."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from eval_test_helpers import char_tokenizer

from eval import benchmarks, templates
from eval.run import main

ROWS = [{"id": "c0", "problem": "What is 6*7?", "answer": "42"},
        {"id": "c1", "problem": "What is 10/4?", "answer": "\\frac{5}{2}"}]


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
                out.append({"output_ids": resp, "meta_info": {
                    "finish_reason": {"type": "stop", "matched": resp[-1]},
                    "output_token_logprobs": [[-0.1, t, None] for t in resp]}})
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
    argv = ["--model", str(model), "--engine", "sglang", "--sglang-url", url, "--benchmarks", str(bench),
            "--n-samples", "4", "--temperature", "0.7", "--max-new-tokens", "128", "--grader-workers", "1",
            "--out", str(out)]
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
    with pytest.raises(SystemExit, match="--sglang-url"):
        main(["--model", str(model), "--engine", "sglang", "--benchmarks", "aime24", "--out", str(tmp_path / "o")])
