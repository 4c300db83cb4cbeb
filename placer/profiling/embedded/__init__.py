"""The embedded default model of ``placer profile``: a small trained Mixtral-family MoE.

Model weights cannot be downloaded where placer runs, and random weights route without
structure, so placer ships one small model trained on Python standard-library source
(``scripts/train_embedded.py``). It is a transformers ``MixtralForCausalLM`` (the generic router
hook profiles it like any other model) with a byte-level tokenizer: ids 0..255 are bytes, then
``BOS``, ``EOS`` and ``PAD``.

Shipped files (package data, next to this module): ``config.json`` (the ``MixtralConfig``),
``model.safetensors`` (float16 weights), ``training.json`` (how it was trained and its measured
routing figures).

Both file lists are pinned with the sha256 each file had when the shipped model was trained
(CPython 3.11.7). Other Python versions hold other versions of these files; the training script
trains on what it finds and says which hashes differ, and the default profiling prompts are
read from whatever held-out files exist.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from placer.errors import InvalidInputError, MissingDependencyError

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "config.json"
WEIGHTS_FILE = HERE / "model.safetensors"
TRAINING_FILE = HERE / "training.json"
NAME = "placer-embedded-mixtral"

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259

# (path relative to the standard library, sha256 on CPython 3.11.7)
TRAIN_FILES: tuple[tuple[str, str], ...] = (
    ("argparse.py", "dc1eba8adfdf615986421f981337458ba1072d3e718a0f76e3224940fd74118b"),
    ("ast.py", "c513073798bdbf3cdef09327d0d2d381a53213a13a4ba3f02729695327539406"),
    ("dataclasses.py", "4b7e1c99ebea53b546317d218a0261895a1769f83a6b95dc0136f13578066a7f"),
    ("difflib.py", "0c6afc23568d55b3e9ac914f9c5361e3033e778aa5b58d3cc82835fc5c638679"),
    ("enum.py", "84fc683aa71da233cf0f6a1bd59ffedc2bc7adb3a40f9339052141176071b6d6"),
    ("functools.py", "6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b"),
    ("inspect.py", "d55ac82f84e5c93953e9f5852ec255957e6c12f47d5cc0ea456447319da0f5af"),
    ("json/decoder.py", "9f02654649816145bc76f8c210a5fe3ba1de142d4d97a1c93105732e747c285b"),
    ("json/encoder.py", "7c358788fbb2a6a07f66f1f8446c52396f35fc201108f666d5be002d86f31af2"),
    ("logging/__init__.py", "bcd33f1595a7fe3858e99cdfe336071200ea5b64cdc95005b311acb2f61d1ad5"),
    ("pathlib.py", "3b21ac188fd9ac20bacc8ccd976fabd5d8ccf5000f8e157d3dfff005b228fb3d"),
    ("pickle.py", "f29792b7bad19b9b7a6096aae01e9a6a0a3ec28029576af74efc530ee331c412"),
    ("subprocess.py", "2ff641d58f8696496e8718538cd96cd7afcd503ae271fb23da22422b3aee9fc7"),
    ("tarfile.py", "d6957647c11b6592e58e37d4e9f02f6cf9ee695cb0653b1072b542b8afac700d"),
    ("textwrap.py", "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c"),
    ("threading.py", "2c4c1db159e1178896eca324082ae98d627c8d7017d0c7135b832f4fb3117210"),
    ("typing.py", "115d96e966bf35cf97126f98dd1fa854a00dd832733fc01ede58cfd4fa490660"),
    ("zipfile.py", "2de79ca464499be92e607a59552b4cb9cf8a9f6e000622b3673a98471c976a57"),
    ("collections/__init__.py", "303701de55e434c0fbcc478ae8a79a28537d9ebe83b3150508438ffd6e3e14c7"),
    ("email/message.py", "58d34f90058df562ca873c0097998ffb60ed5fe596e7e8138b5c450094d0d6c7"),
    ("socket.py", "07f2010f98b7b90c237879c12f738e7305f786d7af4bc06606c4d77fd7fa9e1b"),
    ("selectors.py", "1eeb102373e18c96311203f30c516e785bd8642275aa0bd66e43a284c9692385"),
    ("asyncio/base_events.py", "f2acc35cc35011f8cfbc1a40f5dac893edd781f75c4905896057044fb0e4cf56"),
    ("asyncio/tasks.py", "e88c1a5e5ddd4fff195ad3d086fb774f9fda4956d3b1711f403576804a4ba5c7"),
    ("http/client.py", "5ebb56a7864c690da18594115857e75b7d5cd50e8e934434ebe48e8d5f7377af"),
    ("http/server.py", "d471860df3a8e1264c410d0a7fc092024b2f8ada109f378da50119b81513114e"),
    ("urllib/parse.py", "0e67e2f5a301d0b573698e75a4e2d37c843b48cfe0e29fef894eda90d2189c27"),
    ("urllib/request.py", "d8781dda3bec20d55cce7c2652973491950b271c964e6d5d85965b1d0054bba9"),
    ("unittest/case.py", "f062e82d6bcdc231865b62bd3f8fc8847e49211f4884c685ec696216e227b957"),
    ("unittest/mock.py", "fa902fb34f845839306df49d72f4ee221863d52e13f0d3d1a99b479d14e0e602"),
    ("xml/etree/ElementTree.py", "ff904b02de3a86888001f47f1518204d04d4e790d4ed85352d8544347ae7e940"),
    ("doctest.py", "5a51c6698376a872a78052b31a95b675339a4d82ad33e28477fc5fb1af826ec0"),
    ("optparse.py", "07d224301cba312fa0697bff9cd5a4bb4f778a90629632091b3f4ae874d89af5"),
    ("gettext.py", "a5c249a522b6b8e3aa6f1b12a8bcc09508b99ad612b58d2fc973db27ea3b7cc3"),
    ("locale.py", "ac828df41b2fac93ba3e66a2735216c98c0e1853b8dfb9b859e301fe64153feb"),
    ("datetime.py", "cc9bcb0f1c2f44e1a6cd51882979e113e973c2e65ed84b9aaedabb48d47aa356"),
    ("_pydecimal.py", "14cf1bf7ead78a0beb578f19ebc4ec82f542e0879f5b77d327f01abf74591586"),
    ("random.py", "b931a2d452db89ab9e1f79d59b66ce194dbd6748049cfe44699726da52b9c956"),
    ("tokenize.py", "79aa94ebe1761811ea9b2da2ada409a8cb9abd7c6eac241d0c181a36684bb609"),
    ("traceback.py", "22c8a9a4b34668acf8100613e0bd8cdc997e617e0ad69493b7e00a9b2e1e3f17"),
)
HELDOUT_FILES: tuple[tuple[str, str], ...] = (
    ("calendar.py", "b3b140864fd122a575ffcc9342b824fbe4f8a38fdf3f4fcd964f26e52725358f"),
    ("csv.py", "6c68a5186e3b85e6e267a7ef96479327a45ae2b40bf5e9f2017e4b2282b3f5b1"),
    ("fractions.py", "b11e850e354808b882d13a70a911c29accd1dbdd41757566704e3b7206c74edb"),
    ("shutil.py", "d0dbfcd96ba06684aaf5d55e941aaaf36bb3a22cf537ea9d46317b363bcc5792"),
    ("tempfile.py", "c9169b0ef905999b5d347544cfaa73c4f295777ac07a948aec1e4fdf3ce98a3b"),
    ("heapq.py", "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9"),
    ("statistics.py", "889a066f1b8063e73387ceb84018efc507a89b365b56c6afb9cc15b2ed25c2d9"),
    ("configparser.py", "4a70cecccb55031a413b79e6ced2e63ca031f770cd25a4882980ecdeab67f6ff"),
)

# The architecture the training script builds (and config.json records).
ARCHITECTURE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 512, "rope_theta": 10000.0,
    "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "tie_word_embeddings": True,
    "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "sliding_window": None,
}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``BOS`` (256), ``EOS`` (257) and ``PAD`` (258)."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Ids of ``text``: ``[BOS] + utf-8 bytes``."""
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special ids dropped, invalid UTF-8 replaced)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def find_files(pinned: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The pinned standard-library files present here: ``([(name, content)], notes)``.

    ``notes`` names each file that is missing or whose sha256 differs from the pinned one.
    """
    root = stdlib_dir()
    found, notes = [], []
    for rel, digest in pinned:
        path = root / rel
        if not path.is_file():
            notes.append(f"{rel}: missing")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            notes.append(f"{rel}: sha256 differs from the pinned one")
        found.append((rel, data))
    return found, notes


def heldout_prompts(max_bytes: int = 1024, limit: int | None = None) -> list[str]:
    """Default profiling prompts: the held-out standard-library files cut into windows of
    ``max_bytes`` bytes at line ends (never seen in training)."""
    files, _ = find_files(HELDOUT_FILES)
    if not files:
        raise InvalidInputError("none of the held-out standard-library files is present; give --prompts FILE",
                                source="--prompts")
    prompts: list[str] = []
    for _, data in files:
        text = data.decode("utf-8", errors="replace")
        current = ""
        for line in text.splitlines(keepends=True):
            if current and len((current + line).encode("utf-8")) > max_bytes:
                prompts.append(current)
                current = ""
            current += line
        if current.strip():
            prompts.append(current)
        if limit is not None and len(prompts) >= limit:
            return prompts[:limit]
    return prompts


def architecture_config() -> Any:
    """A fresh ``MixtralConfig`` of the embedded architecture (untrained)."""
    from transformers import MixtralConfig  # deferred: optional extra (placer[profile])
    return MixtralConfig(**ARCHITECTURE)


def load_embedded(dtype: Any = None) -> Any:
    """The trained embedded ``MixtralForCausalLM`` in eval mode (float32 unless ``dtype``)."""
    try:
        import torch  # deferred: optional extra (placer[profile]), as are the two below
        from safetensors.torch import load_file  # deferred: optional extra
        from transformers import MixtralConfig, MixtralForCausalLM  # deferred: optional extra
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "torch", "profile", "profiling the embedded model") from None
    if not CONFIG_FILE.is_file() or not WEIGHTS_FILE.is_file():
        raise InvalidInputError("the embedded model files are not installed; run scripts/train_embedded.py",
                                source=str(HERE))
    config = MixtralConfig(**json.loads(CONFIG_FILE.read_text()))
    with torch.device("cpu"):
        # Any: transformers types ``.to`` as a wrapped function that mypy cannot bind to the instance
        model: Any = MixtralForCausalLM(config)
    state = load_file(str(WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InvalidInputError(f"weights do not match the config (missing {missing[:3]}, unexpected "
                                f"{unexpected[:3]})", source=str(WEIGHTS_FILE))
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype or torch.float32)
    model.eval()
    return model


def training_record() -> dict[str, Any] | None:
    """What ``training.json`` recorded (files, hashes, time, figures), or None."""
    if not TRAINING_FILE.is_file():
        return None
    return json.loads(TRAINING_FILE.read_text())
