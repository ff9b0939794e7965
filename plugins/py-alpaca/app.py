"""A lora preprocessor written in Python (built with componentize-py).

Alpaca-style records ({"instruction", "input", "output"}) become prompt/completion samples:
the prompt is "### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n" and
the completion is the output, so only the response is trained. Records without an output are
dropped; a record that is not an object, or lacks `instruction`, is a per-record error.

Settings: `min_output_chars` (drop shorter outputs; default 1).

Build:  componentize-py -d ../../wit -w preprocessor componentize app -o py_alpaca.wasm
"""

import json

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.exports.preprocess import RecordOutcome
from wit_world.imports import host
from wit_world.imports.types import LogLevel, PromptCompletion, Sample_PromptCompletion

KNOWN = {"min_output_chars"}


class Preprocess(exports.Preprocess):
    min_output_chars = 1

    def configure(self, settings):
        for key, value in settings:
            if key not in KNOWN:
                raise Err(f"unknown setting `{key}`; this plugin accepts: {', '.join(sorted(KNOWN))}")
            try:
                Preprocess.min_output_chars = int(value)
            except ValueError:
                raise Err(f"setting `{key}` = `{value}` is not an integer")
        host.log(LogLevel.INFO, f"py-alpaca configured (min_output_chars={Preprocess.min_output_chars})")

    def process_batch(self, batch, records):
        return [RecordOutcome(r.index, self.one(r.json)) for r in records]

    def one(self, text):
        try:
            rec = json.loads(text)
        except ValueError as e:
            return Err(f"not JSON: {e}")
        if not isinstance(rec, dict):
            return Err("the record is not a JSON object")
        instruction = rec.get("instruction")
        if not isinstance(instruction, str):
            return Err("field `instruction` is missing or not a string")
        output = rec.get("output")
        if not isinstance(output, str) or len(output) < Preprocess.min_output_chars:
            return Ok([])
        prompt = f"### Instruction:\n{instruction}\n\n"
        if rec.get("input"):
            prompt += f"### Input:\n{rec['input']}\n\n"
        prompt += "### Response:\n"
        return Ok([Sample_PromptCompletion(PromptCompletion(prompt, output))])
