"""`rsdjax shard-report --png / --html`: the picture is written, and the bytes it draws are shard-report's."""
import json

import pytest

from rsdjax.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,bars,replicas", [
    (["--model", "tiny", "--mesh", "fsdp=2,tensor=4"], 8, 1),
    (["--model", "llama3.1-405b", "--hardware", "atom-rack", "model.param_dtype=bfloat16"], 16, 14),
])
def test_picture_draws_shard_reports_bytes(capsys, tmp_path, argv, bars, replicas):
    png, page = tmp_path / "shards.png", tmp_path / "shards.html"
    assert main(["shard-report", *argv, "--png", str(png), "--html", str(page), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert "data:image/png;base64," in page.read_text() and report["model"] in page.read_text()
    pic = report["picture"]
    assert len(pic["devices"]) == bars and pic["replicas"] == replicas
    assert pic["capacity"] == report["device_bytes"]
    params = {p["name"]: p["bytes_per_device"] for p in report["params"]}
    for name, per_device in params.items():  # every parameter drawn on every device at shard-report's size
        assert pic["segments"][name] == [per_device] * bars
    drawn_weights = sum(pic["segments"][name][0] for name in params)
    assert drawn_weights == report["total_bytes_per_device"]
    assert pic["segments"]["KV cache"][0] > 0 and pic["segments"]["activations"][0] > 0


def test_picture_to_a_missing_directory_is_a_one_line_error(capsys, tmp_path):
    assert main(["shard-report", "--model", "tiny", "--mesh", "tensor=8", "--png", str(tmp_path / "no" / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
