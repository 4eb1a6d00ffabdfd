"""What Hugging Face transformers makes of the converted packs (run by
hf_transformers.rs with transformers and tokenizers from scripts/python-venv;
no torch: configuration and tokenizers only).

Usage: hf_transformers.py PACKS_DIR TEXT_FILE; prints one JSON object:
for each pack (int8, fp16) the config's model_type or the error loading it
raised, the tokenizer class AutoTokenizer chose, and the ids it and the
tokenizers library give TEXT_FILE's text (no special tokens added).
"""
import json
import sys

import tokenizers
import transformers

packs, text_file = sys.argv[1], sys.argv[2]
text = open(text_file, encoding="utf-8").read()
out = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
for name in ("int8", "fp16"):
    path = f"{packs}/{name}"
    try:
        config = {"model_type": transformers.AutoConfig.from_pretrained(path).model_type}
    except Exception as error:  # transformers raises ValueError; any refusal counts
        config = {"error": f"{type(error).__name__}: {error}"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    out[name] = {
        "config": config,
        "tokenizer_class": type(tokenizer).__name__,
        "ids_transformers": tokenizer(text, add_special_tokens=False)["input_ids"],
        "ids_tokenizers": tokenizers.Tokenizer.from_file(f"{path}/tokenizer.json").encode(text, add_special_tokens=False).ids,
    }
print(json.dumps(out))
