"""Hub model ids (hf.hub_dir): `gpt2` or `org/name` where a HF-format directory is taken
(Transformer.from_pretrained, train.py --init_from and --tokenizer=hf:, generate.py --hf).

No test reaches the internet: a local HTTP server stands in for the Hub (HF_ENDPOINT), serving
small random HF models that transformers saved, laid out as the Hub's `<id>/resolve/main/<file>`.
A download must give the model the local directory gives, be made once (the next load sends no
request), fetch a sharded checkpoint's every shard and only a tokenizer for --tokenizer, send
HF_TOKEN to a gated model, and fail in one line naming the cause: no such model, a gated one
without a token, .bin weights only (never unpickled), a download cut short, a model_type we do not
import (refused before its weights are fetched), an unreachable Hub. A local path wins.
"""
import http.server
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_tokenizers import byte_level, corpus  # noqa: E402

import generate  # noqa: E402
import train  # noqa: E402
from hf import from_pretrained  # noqa: E402

V = 512
TOKEN = "secret"


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(base URL, the requests (path, Authorization header) it has answered, the served root)."""
    root = tmp_path_factory.mktemp("hub")
    repos = {"org/tiny": {}, "org/sharded": {"max_shard_size": "20KB"}, "gated/tiny": {},
             "org/cut": {}}
    hf, tok = tiny_gpt2(), byte_level("gpt2")
    for repo, kw in repos.items():
        path = root / repo / "resolve" / "main"
        hf.save_pretrained(path, **kw)
        tok.save(str(path / "tokenizer.json"))
    pickled = root / "org" / "pickled" / "resolve" / "main"
    pickled.mkdir(parents=True)
    hf.config.to_json_file(pickled / "config.json")
    torch.save(hf.state_dict(), pickled / "pytorch_model.bin")
    whisper = root / "org" / "whisper" / "resolve" / "main"
    whisper.mkdir(parents=True)
    (whisper / "config.json").write_text('{"model_type": "whisper"}')
    (whisper / "model.safetensors").write_bytes(b"\0" * 1000)
    seen = []

    class Hub(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            auth = self.headers.get("Authorization")
            seen.append((self.path, auth))
            if self.path.startswith("/gated/") and auth != f"Bearer {TOKEN}":
                self.send_error(401)
                return
            if self.path == "/org/cut/resolve/main/model.safetensors":  # the connection drops
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"\0" * 1000)
                self.close_connection = True
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen, root
    server.shutdown()


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """The served Hub and an empty cache; returns the requests list, emptied."""
    url, seen, _ = hub
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("ANYFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    seen.clear()
    return seen


def logits(model):
    ids = torch.arange(12)[None] % V
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("repo", ["org/tiny", "org/sharded"])
def test_a_hub_id_loads_as_its_directory_does_and_downloads_once(env, hub, repo, tmp_path):
    local = hub[2] / repo / "resolve" / "main"
    model = from_pretrained(repo)
    torch.testing.assert_close(logits(model), logits(from_pretrained(local)), rtol=0, atol=0)
    got = sorted(p.rsplit("/", 1)[-1] for p, _ in env)
    files = sorted(p.name for p in local.iterdir())
    assert set(got) == set(files) | {"generation_config.json", "model.safetensors.index.json"}
    if repo == "org/sharded":                                      # every shard, each once
        assert len([f for f in files if f.startswith("model-")]) > 1
        assert len(got) == len(set(got))
    cache = tmp_path / "cache" / repo.replace("/", "--")
    assert not list(cache.glob("*.tmp"))
    env.clear()
    torch.testing.assert_close(logits(from_pretrained(repo)), logits(model), rtol=0, atol=0)
    assert env == []                                                # read from the cache


def test_a_gated_model_needs_hf_token(env, monkeypatch):
    with pytest.raises(ValueError, match="HTTP 401.*HF_TOKEN") as e:
        from_pretrained("gated/tiny")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from_pretrained("gated/tiny")
    assert env[-1][1] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("repo, message", [
    ("org/missing", "HTTP 404 .*no config.json"),
    ("org/pickled", "no model.safetensors .*never pickled .bin"),
    ("org/cut", "connection closed after 1,000 of 100,000 bytes of model.safetensors"),
    ("org/whisper", "model_type 'whisper' is not supported"),          # before its weights
])
def test_what_cannot_be_downloaded_is_one_line(env, repo, message, tmp_path):
    with pytest.raises(ValueError, match=message) as e:
        from_pretrained(repo)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.tmp"))            # nothing half-written stays
    if repo == "org/whisper":
        assert not any(p.endswith(".safetensors") for p, _ in env)


def test_an_unreachable_hub_names_the_way_out(env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")         # the discard port: closed
    with pytest.raises(ValueError, match="no local path, and downloading it from the Hub failed"
                                         ".*huggingface-cli download org/tiny --local-dir"):
        from_pretrained("org/tiny")


def test_a_local_directory_wins_over_the_hub(env, hub, monkeypatch, tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(hub[2] / "org" / "tiny" / "resolve" / "main")
    monkeypatch.chdir(tmp_path)
    from_pretrained("org/tiny")
    assert env == []


def test_train_and_generate_take_a_hub_id(env, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(corpus()))
    out = tmp_path / "out"
    train.main([f"--data={text}", f"--out_dir={out}", "--init_from=org/tiny", "--max_iters=2",
                "--eval_interval=2", "--eval_iters=1", "--batch_size=2", "--block_size=32",
                "--sample_tokens=4", "--warmup_iters=0"])
    assert (out / "ckpt.pt").is_file()
    assert any(p.endswith("/tokenizer.json") for p, _ in env)          # init_from's tokenizer
    capsys.readouterr()
    assert generate.main(["--hf", "org/tiny", "--prompt", "the", "--max_new_tokens", "4",
                          "--temperature", "0"]) in (0, None)
    assert capsys.readouterr().out.startswith("the")


def test_a_hub_tokenizer_downloads_no_weights(env, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(corpus()))
    train.main([f"--data={text}", f"--out_dir={tmp_path / 'out'}", "--tokenizer=hf:org/tiny",
                "--n_layer=1", "--n_head=2", "--d_model=16", "--block_size=16", "--max_iters=1",
                "--eval_interval=1", "--eval_iters=1", "--batch_size=2", "--sample_tokens=0"])
    got = {p.rsplit("/", 1)[-1] for p, _ in env}
    assert "tokenizer.json" in got and not any(f.endswith(".safetensors") for f in got)
