"""Exact match: the share of predictions equal to their reference, as an `evaluate` module.

    python -c "import evaluate; m = evaluate.load('clm/eval_modules/exact_match'); print(m.compute(predictions=['a'], references=['a']))"

Shipped with the project so finetuning can score completions offline (`evaluate.load` fetches
metric scripts from the Hub, which may be out of reach). Same options as the Hub's metric of
this name: `ignore_case`, `ignore_punctuation`, `ignore_numbers`, `regexes_to_ignore`; both
sides are compared after stripping surrounding whitespace.
"""

import re
import string

import datasets
import evaluate

_DESCRIPTION = "Share of predictions that equal their reference string (0 to 1)."
_INPUTS = """
Args:
    predictions (list of str): generated texts.
    references (list of str): the expected texts, one per prediction.
    regexes_to_ignore (list of str): patterns removed from both before comparing.
    ignore_case, ignore_punctuation, ignore_numbers (bool): normalisations, default False.
Returns:
    exact_match (float): in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False,
                 ignore_punctuation=False, ignore_numbers=False):
        def normal(text: str) -> str:
            for pattern in regexes_to_ignore or ():
                text = re.sub(pattern, "", text)
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = text.translate(str.maketrans("", "", string.punctuation))
            if ignore_numbers:
                text = text.translate(str.maketrans("", "", string.digits))
            return text.strip()

        hits = sum(normal(p) == normal(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions) if predictions else 0.0}
