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

# the words that identify each finding when parsing
FINDING_WORDS = {"fracture": "fracture", "nodule": "nodule", "opacity": "opacity",
                 "dark focal lesion": "dark_lesion", "bright focal lesion": "lesion"}

LOCATIONS = [
    "right upper zone", "right lower zone", "left upper zone", "left lower zone",
    "proximal tibial shaft", "mid tibial shaft", "distal tibial shaft",
    "right frontal region", "left frontal region", "right occipital region", "left occipital region",
    "upper left quadrant", "upper right quadrant", "lower left quadrant", "lower right quadrant",
]


@dataclass(frozen=True)
class Findings:
    modality: str
    finding: str
    location: str


def caption_for(modality: str, finding: str, location: str) -> str:
    """The caption template filled in; ``finding`` "none" gives the normal caption."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; known: {sorted(MODALITIES)}")
    if finding == "none":
        return f"{MODALITIES[modality]} {NORMAL}."
    if finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; known: {sorted(FINDINGS)} or 'none'")
    if location not in LOCATIONS:
        raise ValueError(f"unknown location {location!r} for finding {finding!r}")
    return f"{MODALITIES[modality]} {FINDINGS[finding].format(location=location)}."


def _normalise(text: str) -> str:
    """Lower case, punctuation and hyphens to spaces, single spaces, padded so phrases match whole words."""
    return " " + " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()) + " "


def _earliest(text: str, phrases: dict[str, str]) -> str:
    """The key of the phrase that occurs first in ``text`` (a caption that rambles on is judged by what it
    says first), or "unknown"."""
    found = [(text.find(_normalise(phrase)), key) for phrase, key in phrases.items()]
    found = [(position, key) for position, key in found if position >= 0]
    return min(found)[1] if found else "unknown"


def parse_caption(caption: str) -> Findings:
    """Modality, finding type and location of a caption in the demo's templates; "unknown" for parts that
    are not recognisable, finding and location "none" for a normal study. Ignores case, punctuation and
    extra words."""
    text = _normalise(caption)
    modality = _earliest(text, {phrase: key for key, phrase in MODALITIES.items()})
    finding = _earliest(text, {**FINDING_WORDS, "no focal abnormality": "none"})
    if finding == "none":
        return Findings(modality, "none", "none")
    location = _earliest(text, {location: location for location in LOCATIONS})
    return Findings(modality, finding, location)


def findings_scores(predictions: dict[str, str], references: dict[str, str]) -> dict[str, float]:
    """``modality_acc``: share of references whose modality (and body part) the prediction gets right;
    ``finding_acc``: share whose finding type AND location are right (a normal study is right when the
    prediction says it is normal). Over all reference ids; a missing prediction counts as wrong. Every
    reference must be in the demo templates."""
    if not references:
        raise ValueError("findings_scores: no references")
    modality_right = finding_right = 0
    for sample_id, reference in references.items():
        want = parse_caption(reference)
        if "unknown" in (want.modality, want.finding, want.location):
            raise ValueError(f"sample {sample_id!r}: reference caption {reference!r} is not in the demo templates")
        got = parse_caption(predictions.get(sample_id, ""))
        modality_right += got.modality == want.modality
        finding_right += (got.finding, got.location) == (want.finding, want.location)
    return {"modality_acc": modality_right / len(references), "finding_acc": finding_right / len(references)}
