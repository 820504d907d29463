"""One CLI grammar: every command and subcommand has --help; every command with a config refuses an
unknown `key=value` naming the nearest valid key, before loading anything."""
import argparse

import pytest

from rsdjax.cli import build_parser, main, parse


def leaves(parser: argparse.ArgumentParser, prefix=()):
    """(argv prefix) of every command and subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if prefix:
        yield prefix
    for action in subs:
        for name, child in action.choices.items():
            yield from leaves(child, prefix + (name,))


COMMANDS = list(leaves(build_parser()))


def test_every_command_is_listed():
    assert {c[0] for c in COMMANDS} >= {"convert", "shard-report", "plan", "tokenizer", "train", "finetune", "lora",
                                        "generate", "eval", "serve", "route", "warmup"}
    assert ("tokenizer", "extend") in COMMANDS and ("lora", "merge") in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rsdjax " + " ".join(argv)) and "--help" in out


@pytest.mark.parametrize("argv, key", [(["train"], "optim.lr"), (["finetune"], "lora.r"), (["generate"], "model.rope_theta"),
                                       (["serve"], "model.num_layers"), (["warmup"], "model.dtype"),
                                       (["plan"], "cost.compute_efficiency"), (["shard-report"], "hardware.device.memory_gb.value")])
def test_help_lists_the_config_keys(argv, key, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    assert key in capsys.readouterr().out.split("config keys (key=value):")[1].replace("\n", " ")


# (argv before the override, a misspelled key, the valid key the error must name)
UNKNOWN = [
    (["train", "cpt-demo"], "optim.lrr=1e-3", "optim.lr"),
    (["finetune", "lora-qa-demo"], "lora.rank=4", "lora.r"),
    (["finetune", "lora-qa-demo"], "optim.learning_rate=1e-3", "optim.lr"),
    (["plan", "--model", "tiny"], "model.num_layer=2", "model.num_layers"),
    (["plan", "--model", "tiny"], "cost.compute_eficiency=0.5", "cost.compute_efficiency"),
    (["shard-report", "--model", "tiny"], "hardware.device.memory_gb.valu=8", "hardware.device.memory_gb.value"),
    (["generate", "--model", "/nonexistent", "--prompt", "hi"], "model.rope_thetta=1", "model.rope_theta"),
    (["warmup", "--model", "/nonexistent"], "model.dtyp=float32", "model.dtype"),
    (["serve", "--model", "/nonexistent"], "num_layers=2", "model.num_layers"),
    (["eval", "--model", "/nonexistent", "text.txt"], "model.dtyp=float32", "model.dtype"),
]


def lists_config_keys(argv, capsys) -> bool:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return "config keys (key=value):" in capsys.readouterr().out


def test_every_command_with_a_config_is_checked(capsys):
    """Derived from the parser: each command whose --help lists config keys has a case in UNKNOWN."""
    with_config = {c for c in COMMANDS if lists_config_keys(c, capsys)}
    assert {"train", "finetune", "generate", "serve", "warmup", "plan", "shard-report", "eval"} <= {c[0] for c in with_config}
    assert with_config <= {(argv[0],) for argv, _, _ in UNKNOWN}, with_config - {(argv[0],) for argv, _, _ in UNKNOWN}


@pytest.mark.parametrize("argv, override, nearest", UNKNOWN, ids=[f"{a[0]}:{o}" for a, o, _ in UNKNOWN])
def test_unknown_key_names_the_nearest(argv, override, nearest, capsys):
    assert main([*argv, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rsdjax {argv[0]}: error: "), err
    key = override.split("=")[0]
    assert f"unknown config key '{key}' (did you mean '{nearest}'?)" in err[0] or f"'{key}' is now '{nearest}'" in err[0], err


@pytest.mark.parametrize("argv, load, key", [
    (["train", "cpt-demo"], "rsdjax.train.config:load_train_config", "run_dir"),
    (["finetune", "lora-qa-demo"], "rsdjax.sft:load_finetune_config", "output")])
def test_output_flag_is_the_config_output(argv, load, key, capsys):
    import importlib

    from rsdjax.cli.common import output_override

    module, name = load.split(":")
    load_config = getattr(importlib.import_module(module), name)
    args = parse(build_parser(), [*argv, "-o", "runs/on", "seed=3"])  # "on" stays a path, not YAML's True
    assert getattr(load_config(args.config, output_override(args)), key) == "runs/on"
    assert main([*argv, "-o", "runs/a", f"{key}=runs/b"]) == 2
    assert "give the output once" in capsys.readouterr().err


def test_eval_overrides_are_model_keys():
    from rsdjax.cli.eval import split_data

    assert split_data(["wiki=a.txt,b.txt", "model.dtype=float32", "c.txt", "model.txt"]) == \
        (["model.dtype=float32"], ["wiki=a.txt,b.txt", "c.txt", "model.txt"])
