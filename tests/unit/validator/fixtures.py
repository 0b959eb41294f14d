"""Every hostile and benign fixture of the unsafe-code check, by class, in one registry.

hostile.py holds the pickle, archive, numpy, Keras-Lambda and config classes; keras_tf_fixtures.py
the Keras layers and SavedModel graphs beyond Lambda; templates.py the chat templates, written
here into the files a model ships them in. The check's tests and bench/validator_bench.py read
these registries, so a class added here is tested and benchmarked against every scanner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.unit.validator import hostile, keras_tf_fixtures
from tests.unit.validator.hostile import Writer, marker, write_safetensors_dir
from tests.unit.validator.templates import BENIGN_TEMPLATES, HOSTILE_TEMPLATES, MARKER_PLACEHOLDER


def armed(template: str, directory: Path) -> str:
    """A hostile template whose payload would create the marker file, if it ever ran."""
    return template.replace(MARKER_PLACEHOLDER, str(marker(directory)))


def write_gguf_with_templates(path: Path, templates: dict[str, str]) -> Path:
    """A real GGUF (gguf's own writer) carrying chat templates, one tiny tensor."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for name, template in templates.items():
        if name == "default":
            writer.add_chat_template(template)
        else:
            writer.add_string(f"tokenizer.chat_template.{name}", template)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tokenizer_config_writer(template_name: str) -> Writer:
    def write(directory: Path) -> Path:
        model = write_safetensors_dir(directory)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
        config["chat_template"] = armed(HOSTILE_TEMPLATES[template_name], directory)
        (model / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return model

    return write


def write_gguf_cve_2024_34359(directory: Path) -> Path:
    """The llama-cpp-python advisory as published: the payload in GGUF metadata."""
    template = armed(HOSTILE_TEMPLATES["cve-2024-34359"], directory)
    return write_gguf_with_templates(directory / "model.gguf", {"default": template})


def write_chat_template_jinja_file(directory: Path) -> Path:
    model = write_safetensors_dir(directory)
    template = armed(HOSTILE_TEMPLATES["attr-filter-string-built"], directory)
    (model / "chat_template.jinja").write_text(template)
    return model


def write_gguf_llama3_template(directory: Path) -> Path:
    template = BENIGN_TEMPLATES["llama-3.1-instruct"]
    return write_gguf_with_templates(directory / "model.gguf", {"default": template})


def write_tokenizer_config_qwen_tools(directory: Path) -> Path:
    model = write_safetensors_dir(directory)
    config = {
        "chat_template": BENIGN_TEMPLATES["qwen2.5-instruct-tools"],
        "eos_token": "<|im_end|>",
    }
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


# A few template classes stand for all 37 in templates.py, which test_chat_templates.py covers
# one by one at the parser level.
CHAT_TEMPLATE_HOSTILE: dict[str, Writer] = {
    "gguf_chat_template_cve_2024_34359": write_gguf_cve_2024_34359,
    "tokenizer_config_template_lipsum_globals": _tokenizer_config_writer("lipsum-globals"),
    "tokenizer_config_template_llama3_with_payload": _tokenizer_config_writer(
        "llama-3-with-payload"
    ),
    "chat_template_jinja_string_built_attr": write_chat_template_jinja_file,
}
CHAT_TEMPLATE_BENIGN: dict[str, Writer] = {
    "gguf_llama3_chat_template": write_gguf_llama3_template,
    "tokenizer_config_qwen_tools_template": write_tokenizer_config_qwen_tools,
}
CHAT_TEMPLATE_EXPECTED: dict[str, tuple[str, ...]] = {
    "gguf_chat_template_cve_2024_34359": (
        "model.gguf: GGUF tokenizer.chat_template: line 1: reads attribute",
        "CVE-2024-34359",
    ),
    "tokenizer_config_template_lipsum_globals": (
        "tokenizer_config.json: chat_template: line 1: reads attribute __globals__ of lipsum",
    ),
    "tokenizer_config_template_llama3_with_payload": (
        "tokenizer_config.json: chat_template: line 4",
    ),
    "chat_template_jinja_string_built_attr": (
        "chat_template.jinja: template: line 1: builds the name",
    ),
}

HOSTILE: dict[str, Writer] = hostile.HOSTILE | keras_tf_fixtures.HOSTILE | CHAT_TEMPLATE_HOSTILE
BENIGN: dict[str, Writer] = hostile.BENIGN | keras_tf_fixtures.BENIGN | CHAT_TEMPLATE_BENIGN
# What some finding of each class-level fixture must say (hostile.py's are in the test itself).
EXPECTED: dict[str, tuple[str, ...]] = keras_tf_fixtures.EXPECTED | CHAT_TEMPLATE_EXPECTED
