"""Tokenizer, special token ids and the LLaDA-V chat template, with the `tokenizers` library only.

Token ids always come from the checkpoint's (or bundle's) tokenizer files: a small test
checkpoint has a small vocabulary, and the real config.json even carries a wrong bos_token_id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.errors import LladaVError

IMAGE_PLACEHOLDER = "<image>"  # the prompt is split here; LLaVA marks the spot with id -200 instead

SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "mask": "<|mdm_mask|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
}

SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class TokenIds:
    """Ids of the special tokens the generator needs, read from the tokenizer files."""

    bos: int
    eos: int
    mask: int
    start_header: int
    end_header: int
    eot: int

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Logits set to -inf at masked positions (LLaDA-V generate_with_embeds)."""
        return (self.eos, self.bos, self.start_header, self.end_header)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PromptIds:
    """The chat prompt as token ids around its image placeholders: prefix, <image>, suffix for one
    image; with several, the text between consecutive placeholders in `between`."""

    prefix: tuple[int, ...]  # up to and including "<|start_header_id|>user<|end_header_id|>\n\n"
    suffix: tuple[int, ...]  # "\n{question}<|eot_id|>...assistant<|end_header_id|>\n\n"
    between: tuple[tuple[int, ...], ...] = ()  # several images: the text between image i and image i + 1

    @property
    def n_images(self) -> int:
        return len(self.between) + 1

    @property
    def n_text(self) -> int:
        return len(self.prefix) + sum(map(len, self.between)) + len(self.suffix)

    def segments(self) -> list:
        """The prompt in sequence order: token-id tuples (text) and image indices (ints)."""
        out: list = [self.prefix]
        for i, text in enumerate(self.between):
            out += [i, text]
        return out + [self.n_images - 1, self.suffix]


def chat_prompt(question: str, system: str = SYSTEM_PROMPT) -> str:
    """LLaDA-V's template for one image and one question (the image placeholder is included)."""
    return chat_turn(f"{IMAGE_PLACEHOLDER}\n{question}", system)


def chat_turn(user: str, system: str = SYSTEM_PROMPT) -> str:
    """LLaDA-V's template around one user turn (which carries its image placeholders)."""
    return (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def camera_turn(question: str, cameras: list[str]) -> str:
    """The user turn of a several-camera request: one line per camera naming its image, then the
    question ("front camera: <image>\nleft camera: <image>\n{question}"); a question that places its
    own placeholders (one per camera, in the cameras' order) is taken as it is."""
    if IMAGE_PLACEHOLDER in question:
        return question
    return "".join(f"{name} camera: {IMAGE_PLACEHOLDER}\n" for name in cameras) + question


class TextTokenizer:
    """tokenizer.json + the special token ids, loaded without transformers."""

    def __init__(self, directory):
        from tokenizers import Tokenizer  # light, but keep `import runtime` free of it

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise LladaVError(f"tokenizer: {str(path)!r} is missing; expected the checkpoint's tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise LladaVError(f"tokenizer: {str(path)!r} is malformed ({exc})") from None
        self.ids = TokenIds(**{name: self._token_id(path, text) for name, text in SPECIAL_TOKENS.items()})

    def _token_id(self, path: Path, text: str) -> int:
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise LladaVError(f"tokenizer: {str(path)!r} has no token {text!r}; LLaDA-V needs it")
        return token_id

    def special_texts(self) -> set[str]:
        """LLaDA-V's special tokens and every token the tokenizer file marks special."""
        added = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        return set(SPECIAL_TOKENS.values()) | added

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text are recognised, none are added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, question: str, cameras: list[str] | None = None) -> PromptIds:
        """The chat prompt for `question`, split at its image placeholders. cameras: the names of a
        several-image request's images (runtime.cameras), which the prompt names (camera_turn)."""
        if cameras and len(cameras) > 1:
            return self._camera_prompt(question, cameras)
        if IMAGE_PLACEHOLDER in question:
            raise LladaVError(
                f"prompt: contains {IMAGE_PLACEHOLDER!r}; expected plain text (the image goes in automatically)"
            )
        self._check_text(question)
        before, after = chat_prompt(question).split(IMAGE_PLACEHOLDER)
        return PromptIds(tuple(self.encode(before)), tuple(self.encode(after)))

    def _camera_prompt(self, question: str, cameras: list[str]) -> PromptIds:
        found = question.count(IMAGE_PLACEHOLDER)
        if found and found != len(cameras):
            raise LladaVError(f"prompt: {found} {IMAGE_PLACEHOLDER!r} placeholder(s) for {len(cameras)} images "
                              f"({', '.join(cameras)}); expected one per image, in that order, or none (each "
                              "camera's line is added)")
        self._check_text(question.replace(IMAGE_PLACEHOLDER, ""))
        chunks = [tuple(self.encode(c)) for c in chat_turn(camera_turn(question, cameras)).split(IMAGE_PLACEHOLDER)]
        return PromptIds(chunks[0], chunks[-1], tuple(chunks[1:-1]))

    def _check_text(self, question: str) -> None:
        if not question.strip():
            raise LladaVError("prompt: empty; expected a question about the image")
        markers = sorted(t for t in self.special_texts() if t in question)
        if markers:  # they would be read as the chat template's own structure, not as text
            raise LladaVError(f"prompt: contains the special token(s) {markers}; expected plain text (the chat "
                              "template's markers are added around the question, never taken from it)")
        before, after = chat_prompt(question).split(IMAGE_PLACEHOLDER)
        return PromptIds(tuple(self.encode(before)), tuple(self.encode(after)))

