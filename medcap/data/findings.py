"""The demo data's caption templates, and the parser that reads modality, finding and location back from a
caption, so that generated captions can be scored on whether their findings are right."""

import re
from dataclasses import dataclass

# One sentence per caption: "<modality> with <finding> in the <location>." (a single sentence keeps the frozen
# LLM from ending or rambling at a sentence boundary).
MODALITIES = {
    "chest_xray": "Frontal chest radiograph",
    "leg_xray": "Radiograph of the lower leg",
    "head_ct": "Axial CT of the head",
    "shoulder_mr": "Coronal MRI of the shoulder",
    "abdomen_mr": "Axial MRI of the abdomen",
    "ultrasound": "Doppler ultrasound of a lymph node",
    "fundus": "Colour fundus photograph",
    "histology": "Immunohistochemistry-stained tissue section",
}

# finding key -> template ({location} is filled in)
FINDINGS = {
    "nodule": "with a rounded nodule in the {location}",
    "opacity": "with an ill-defined opacity in the {location}",
    "fracture": "with a fracture line through the {location}",
    "lesion": "with a bright focal lesion in the {location}",
    "dark_lesion": "with a dark focal lesion in the {location}",
}
NORMAL = "with no focal abnormality"

LOCATIONS = [
    "right upper zone", "right lower zone", "left upper zone", "left lower zone",
    "proximal tibial shaft", "mid tibial shaft", "distal tibial shaft",
    "right frontal region", "left frontal region", "right occipital region", "left occipital region",
    "upper left quadrant", "upper right quadrant", "lower left quadrant", "lower right quadrant",
]

_FINDING_WORDS = [("fracture", "fracture"), ("nodule", "nodule"), ("opacity", "opacity"),
                  ("dark focal lesion", "dark_lesion"), ("bright focal lesion", "lesion")]


@dataclass(frozen=True)
class Findings:
    modality: str
    finding: str
    location: str


def caption_for(modality: str, finding: str, location: str) -> str:
    second = NORMAL if finding == "none" else FINDINGS[finding].format(location=location)
    return f"{MODALITIES[modality]} {second}."


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def parse_caption(caption: str) -> Findings:
    """Modality, finding type and location of a caption in the demo's templates; ``unknown`` for parts that
    are not recognisable. Matching ignores case, punctuation and extra words."""
    text = _normalise(caption)
    modality = next((k for k, v in MODALITIES.items() if _normalise(v) in text), "unknown")
    if "no focal abnormality" in text:
        return Findings(modality, "none", "none")
    finding = next((key for word, key in _FINDING_WORDS if word in text), "unknown")
    location = next((loc for loc in LOCATIONS if loc in text), "unknown")
    return Findings(modality, finding, location)


def findings_scores(predictions: dict[str, str], references: dict[str, str]) -> dict[str, float]:
    """``modality_acc``: share of references whose modality (and body part) the prediction gets right;
    ``finding_acc``: share whose finding type AND location are right (a normal study is right when the
    prediction says it is normal). Over all reference ids; a missing prediction counts as wrong."""
    modality_right = finding_right = 0
    for sample_id, reference in references.items():
        want, got = parse_caption(reference), parse_caption(predictions.get(sample_id, ""))
        modality_right += got.modality == want.modality
        finding_right += (got.finding, got.location) == (want.finding, want.location)
    n = max(len(references), 1)
    return {"modality_acc": modality_right / n, "finding_acc": finding_right / n}
