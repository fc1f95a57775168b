"""attention_ext.info(): the environment report a bug report needs."""

import attention_ext


def test_info_lines(capsys):
    attention_ext.info()
    out = capsys.readouterr().out
    labels = {line.split("  ")[0] for line in out.splitlines()}
    for label in ("attention_ext", "torch", "CPU", "CPU flags seen", "torch CPU capability", "torch avx512_bf16",
                  "torch AMX tiles", "CPU ISA path", "available ISAs", "bf16 dot products", "AMX tiles",
                  "CUDA built", "CUDA archs compiled", "transformers", "attn_implementation"):
        assert label in labels, (label, out)
    report = dict(attention_ext._info.report())
    assert report["attention_ext"].startswith(attention_ext.__version__)
    assert report["CPU ISA path"].startswith(attention_ext.cpu_isa() + ":")
    assert report["available ISAs"] == ", ".join(attention_ext.available_cpu_isas())
    assert report["bf16 dot products"].startswith("active") == ("bf16" in attention_ext.cpu_isa())


def test_info_module_stays_callable(capsys):
    import attention_ext.info  # rebinds the package's `info` to the module, which must still run the report

    attention_ext.info()
    assert "CPU ISA path" in capsys.readouterr().out
