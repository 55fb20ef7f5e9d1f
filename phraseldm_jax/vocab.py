"""The 1000-token REMI-z phrase vocabulary, with ids exactly as the original tokenizer.

Ids 0-22 are special tokens, then ``b-1`` and the REMI-z families in a fixed order
(SPEC section 2). The original ships this vocabulary as a Hugging Face ``tokenizer.json``
(a WordLevel model whose 1000 tokens are all "added tokens"); ``to_tokenizer_json`` and
``from_tokenizer_json`` read and write that layout without needing the ``tokenizers``
package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from phraseldm_jax import fileio

SPECIAL_TOKENS: tuple[str, ...] = (
    "[EOS]", "[BOS]", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[HIST]", "[PITCH]",
    "[INST]", "[MELODY]", "[CHORD]", "[COMPRESS]",
    *(f"[C{k}]" for k in range(10)),
)  # fmt: skip

# (prefix, count) of each REMI-z token family after the specials and ``b-1``.
TOKEN_FAMILIES: tuple[tuple[str, int], ...] = (
    ("o", 128),  # onset position, 48 per 4/4 bar
    ("i", 129),  # GM program, 128 = drums
    ("p", 256),  # pitch, >= 128 is a drum pitch + 128
    ("d", 128),  # duration in 48ths of a bar
    ("v", 32),  # velocity bin
    ("s", 254),  # time signature
    ("t", 49),  # tempo
)

EOS_ID = 0
BOS_ID = 1
UNK_ID = 2
SEP_ID = 4
PAD_ID = 5
MASK_ID = 6
INST_ID = 9
QUERY_IDS = tuple(range(13, 23))  # [C0]..[C9]

# The special-token roles the original gives its tokenizer (FACTS 1.2): transformers needs them
# set for padding and ``generate``; tokenizer.json alone does not carry them.
SPECIAL_TOKEN_ROLES: dict[str, str] = {
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BAR_ID = 23  # b-1
VOCAB_SIZE = 1000
IGNORE_LABEL = -100  # label value that the losses skip


def _all_tokens() -> tuple[str, ...]:
    tokens = list(SPECIAL_TOKENS) + ["b-1"]
    for prefix, count in TOKEN_FAMILIES:
        tokens.extend(f"{prefix}-{k}" for k in range(count))
    return tuple(tokens)


class UnknownTokenError(ValueError):
    """A token string that is not in the vocabulary."""


class Vocabulary:
    """Bidirectional token <-> id mapping.

    Args:
      tokens: the token of each id, in id order.
    """

    def __init__(self, tokens: Sequence[str]):
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        if len(self.token_to_id) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __hash__(self) -> int:
        return hash(self.tokens)

    def id_of(self, token: str, source: str | None = None) -> int:
        """Id of one token; raises ``UnknownTokenError`` naming it (and ``source``)."""
        try:
            return self.token_to_id[token]
        except KeyError:
            where = f" in {source}" if source else ""
            raise UnknownTokenError(f"unknown token {token!r}{where}") from None

    def encode(self, text: str | Iterable[str], source: str | None = None) -> list[int]:
        """Ids of a whitespace-separated token string (or a token list).

        Args:
          text: e.g. ``"i-0 o-0 p-60 d-12"``.
          source: where the text came from (a file, a record), quoted in errors.
        """
        tokens = text.split() if isinstance(text, str) else list(text)
        ids = []
        for position, token in enumerate(tokens):
            if token not in self.token_to_id:
                where = f"{source}, " if source else ""
                raise UnknownTokenError(
                    f"unknown token {token!r} ({where}token {position} of {len(tokens)})"
                )
            ids.append(self.token_to_id[token])
        return ids

    def decode(self, ids: Iterable[int], skip: Iterable[int] = ()) -> str:
        """Space-joined tokens of ``ids``, leaving out the ids in ``skip``."""
        skip = set(skip)
        out = []
        for i in ids:
            i = int(i)
            if i in skip:
                continue
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self)})")
            out.append(self.tokens[i])
        return " ".join(out)

    # --- Hugging Face tokenizer.json ---------------------------------------------------

    def to_tokenizer_json(self) -> dict:
        """The original's ``tokenizer.json`` layout: WordLevel, empty base vocab, all tokens
        added, whitespace-split pre-tokenizer, no normaliser, post-processor or decoder."""
        added = []
        for i, token in enumerate(self.tokens):
            special = i < len(SPECIAL_TOKENS)
            added.append(
                {
                    "id": i,
                    "content": token,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": not special,
                    "special": special,
                }
            )
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": None,
            "decoder": None,
            "model": {"type": "WordLevel", "vocab": {}, "unk_token": "[UNK]"},
        }

    def save_tokenizer_json(self, path: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` atomically (temporary file, then rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_tokenizer_json(), f, ensure_ascii=False, indent=2)
        os.replace(tmp, path)

    def tokenizer_config(self) -> dict:
        """``tokenizer_config.json`` as transformers' ``save_pretrained`` writes it for a
        ``PreTrainedTokenizerFast`` with the original's special tokens (right padding and
        truncation)."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **SPECIAL_TOKEN_ROLES,
            "padding_side": "right",
            "truncation_side": "right",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,  # transformers' "no limit"
            "added_tokens_decoder": {
                str(i): {
                    "content": token,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for i, token in enumerate(SPECIAL_TOKENS)
            },
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """A tokenizer folder that ``transformers.AutoTokenizer.from_pretrained(folder)`` loads
        offline (``TOKENIZER_FILES``, each written atomically), special tokens set."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        fileio.write_json(os.path.join(folder, "tokenizer.json"), self.to_tokenizer_json(),
                          sort_keys=False)  # fmt: skip
        fileio.write_json(os.path.join(folder, "special_tokens_map.json"), SPECIAL_TOKEN_ROLES)
        fileio.write_json(os.path.join(folder, "tokenizer_config.json"), self.tokenizer_config())

    @classmethod
    def from_tokenizer_json(cls, data: dict | str | os.PathLike) -> Vocabulary:
        """Reads a Hugging Face ``tokenizer.json`` (dict, or a path to the file).

        Tokens may sit in ``added_tokens`` or the WordLevel ``model.vocab``; ids must be
        0..N-1 without gaps.
        """
        source = "tokenizer.json"
        if not isinstance(data, dict):
            source = os.fspath(data)
            with open(source, encoding="utf-8") as f:
                data = json.load(f)
        model = data.get("model") or {}
        if model.get("type", "WordLevel") != "WordLevel":
            raise ValueError(f"{source}: expected a WordLevel model, got {model.get('type')!r}")
        by_id: dict[int, str] = {}
        entries = [(int(i), t) for t, i in (model.get("vocab") or {}).items()]
        entries += [(int(e["id"]), e["content"]) for e in data.get("added_tokens") or []]
        for i, token in entries:
            if by_id.setdefault(i, token) != token:
                raise ValueError(f"{source}: id {i} maps to both {by_id[i]!r} and {token!r}")
        if sorted(by_id) != list(range(len(by_id))):
            missing = sorted(set(range(max(by_id) + 1)) - set(by_id))[:10]
            raise ValueError(f"{source}: token ids are not contiguous; missing {missing}")
        return cls([by_id[i] for i in range(len(by_id))])


PHRASE_VOCAB = Vocabulary(_all_tokens())
assert len(PHRASE_VOCAB) == VOCAB_SIZE
