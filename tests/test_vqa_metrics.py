import pytest

from medcap.metrics.vqa import (answer_key, closed_match, normalize_answer, parse_choice, per_record_correct,
                                vqa_accuracy)
from medcap.vqa import correct_option

OPTIONS = {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound"}
NINE = {"A": "CT", "B": "MRI", "C": "PET", "D": "SPECT", "E": "X-ray", "F": "Ultrasound", "G": "Angiography",
        "H": "Mammography", "I": "Fluoroscopy"}


@pytest.mark.parametrize("text, expected", [
    ("  The  Lesion, is 2.5 cm. ", "lesion is 2.5 cm"),
    ("A mass in the lung", "mass in lung"),
    ("An anterior theta wave", "anterior theta wave"),  # articles only as whole words
    ("Two nodules", "2 nodules"),
    ("zero; ten! eleven", "0 10 eleven"),
    ("X-ray (chest)", "x ray chest"),
    ("3.0.", "3.0"),
    ("end.5 and .5", "end 5 and 5"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction", ["B", "b", "(B)", "B.", "B)", "[B]", " B \n", "( b )."])
def test_whole_answer_letter(prediction):
    assert parse_choice(prediction, OPTIONS) == "B"


@pytest.mark.parametrize("prediction, expected", [
    ("B. MRI", "B"),
    ("B) MRI", "B"),
    ("B: MRI", "B"),
    ("(C) X-ray of the chest", "C"),
    ("A. MRI", "A"),  # an explicit letter wins over the option text
    ("d) it is an ultrasound", "D"),
])
def test_leading_letter_with_separator(prediction, expected):
    assert parse_choice(prediction, OPTIONS) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("Answer: B", "B"),
    ("The answer is (B).", "B"),
    ("I would pick option B.", "B"),
    ("Option: D", "D"),
    ("The correct choice is C because of the bones.", "C"),
    ("the answer is: a", "A"),
    ("Option A is correct.", "A"),  # "is" follows a letter, never an article
    ("Looking at the image, the answer is [D]", "D"),
    ("The answer is option C", "C"),
])
def test_answer_phrases(prediction, expected):
    assert parse_choice(prediction, OPTIONS) == expected


def test_letters_not_in_options_do_not_count():
    assert parse_choice("Answer: E", OPTIONS) is None
    assert parse_choice("E", OPTIONS) is None
    assert parse_choice("E. coli", OPTIONS) is None
    # the first letter that is an option wins
    assert parse_choice("Answer: E, so option C", OPTIONS) == "C"


def test_any_subset_of_letters():
    options = {"X": "CT", "Y": "X-ray"}
    assert parse_choice("Y", options) == "Y"
    assert parse_choice("Answer: X-ray", options) == "Y"  # "X-ray" is a word, not the letter X
    assert parse_choice("answer: x", options) == "X"


def test_article_is_not_option_a():
    assert parse_choice("A nodule is seen", OPTIONS) is None
    assert parse_choice("A nodule is seen on the MRI", OPTIONS) == "B"
    assert parse_choice("The answer is a nodule", OPTIONS) is None
    assert parse_choice("The best option is a PET scan", OPTIONS) is None
    assert parse_choice("Answer: A nodule in the left lung", OPTIONS) is None


def test_pronoun_is_not_option_i():
    assert parse_choice("Answer: I think it is MRI", NINE) == "B"
    assert parse_choice("Answer: I", NINE) == "I"


@pytest.mark.parametrize("prediction, expected", [
    ("MRI", "B"),
    ("It is an MRI of the brain.", "B"),
    ("ultrasound", "D"),
    ("This looks like an x-ray.", "C"),
    ("The CTA shows a stenosis", None),  # whole words only: "CT" is not in "CTA"
    ("Either CT or MRI", None),  # two unrelated options: ambiguous
    ("", None),
    ("I cannot tell", None),
])
def test_option_text(prediction, expected):
    assert parse_choice(prediction, OPTIONS) == expected


def test_longest_containing_option_text_wins():
    options = {"A": "Chest X-ray", "B": "X-ray", "C": "CT"}
    assert parse_choice("This is a chest x-ray.", options) == "A"
    assert parse_choice("This is an X-ray", options) == "B"
    assert parse_choice("A chest x-ray, then a CT", options) is None  # "CT" is not inside "chest x ray"


def test_identical_option_texts_are_ambiguous():
    assert parse_choice("x-ray", {"A": "X-ray", "B": "x ray"}) is None


def test_number_words_in_option_text():
    options = {"A": "1", "B": "2", "C": "3"}
    assert parse_choice("There are two lesions", options) == "B"


@pytest.mark.parametrize("prediction, answer, expected", [
    ("Yes, there is a fracture.", "yes", True),
    ("No.", "no", True),
    ("no", "yes", False),
    ("Not sure", "no", False),
    ("There is no fracture", "no", False),  # only the first word counts
    ("Two", "2", True),
    ("the left lung", "Left lung", True),
    ("left lung", "right lung", False),
    ("Left lung, upper lobe", "left lung", False),  # the first-word rule is for yes/no only
    ("Fracture not seen", "fracture", False),
])
def test_closed_match(prediction, answer, expected):
    assert closed_match(prediction, answer) is expected


def _records() -> list[dict]:
    return [
        {"id": "ct1", "modality": "CT", "options": OPTIONS, "answer": "B", "prediction": "B. MRI"},  # right
        {"id": "ct2", "modality": "CT", "answer": "yes", "prediction": "Yes, there is a mass.",
         "question_type": "presence"},  # right
        {"id": "ct3", "modality": "CT", "options": OPTIONS, "answer": "A",
         "prediction": "A nodule is seen"},  # unparsed, wrong
        {"id": "ct4", "modality": "CT", "options": OPTIONS, "answer": "Ultrasound", "prediction": "Answer: D"},  # right
        {"id": "mr1", "modality": "MRI", "answer": "no", "prediction": "yes", "question_type": "presence"},  # wrong
        {"id": "mr2", "modality": "MRI", "options": OPTIONS, "answer": "C", "prediction": "the answer is (C)"},  # right
    ]


def test_per_record_correct():
    assert per_record_correct(_records()) == [True, True, False, True, False, True]


def test_vqa_accuracy_by_modality():
    # CT: 3 of 4 right = 0.75; MRI: 1 of 2 right = 0.5
    # overall: 4 of 6 = 2/3; macro: (0.75 + 0.5) / 2 = 0.625
    result = vqa_accuracy(_records())
    assert result == {"accuracy": 4 / 6, "macro_accuracy": 0.625, "n": 6, "unparsed": 1,
                      "accuracy/CT": 0.75, "accuracy/MRI": 0.5}


def test_vqa_accuracy_without_groups():
    result = vqa_accuracy(_records(), group_by=None)
    assert result == {"accuracy": 4 / 6, "macro_accuracy": 4 / 6, "n": 6, "unparsed": 1}


def test_vqa_accuracy_missing_group_field_is_unknown():
    # presence: ct2 right, mr1 wrong = 0.5; unknown: ct1, ct4, mr2 right, ct3 wrong = 0.75; macro 0.625
    result = vqa_accuracy(_records(), group_by="question_type")
    assert result["accuracy/presence"] == 0.5
    assert result["accuracy/unknown"] == 0.75
    assert result["macro_accuracy"] == 0.625


def test_multiple_choice_answer_given_as_letter_forms_or_text():
    records = [{"id": "a", "options": OPTIONS, "answer": "(b)", "prediction": "MRI"},
               {"id": "b", "options": OPTIONS, "answer": "x-ray", "prediction": "C"},
               {"id": "c", "options": OPTIONS, "answer": "x-ray", "prediction": "B"}]
    assert per_record_correct(records) == [True, True, False]


def test_empty_records_raise():
    with pytest.raises(ValueError, match="no records"):
        vqa_accuracy([])


def test_missing_prediction_names_id_and_field():
    records = _records()
    del records[2]["prediction"]
    with pytest.raises(ValueError, match=r"id 'ct3' has no 'prediction'"):
        vqa_accuracy(records)


def test_missing_answer_names_index_when_no_id():
    records = [{"answer": "yes", "prediction": "yes"}, {"prediction": "no"}]
    with pytest.raises(ValueError, match=r"at index 1 has no 'answer'"):
        vqa_accuracy(records)
    with pytest.raises(ValueError, match=r"at index 0 has no 'answer'"):
        per_record_correct([{"answer": "  ", "prediction": "no"}])


def test_answer_text_matching_no_option_raises():
    records = [{"id": "q9", "options": OPTIONS, "answer": "PET", "prediction": "A"}]
    with pytest.raises(ValueError, match=r"q9.*'PET'"):
        vqa_accuracy(records)


@pytest.mark.parametrize("answer, options, key", [
    ("X-ray", {"A": "X-ray", "B": "X ray"}, "A"),  # the exact text first, as the seed matched
    ("benign", {"A": "Benign", "B": "benign"}, "B"),
    ("CT", {"A": "CT", "B": "CT"}, "A"),  # the first of equal texts
    ("x ray", {"A": "X-ray", "B": "MRI"}, "A"),  # else the one normalised match
    ("x ray", {"A": "X-ray", "B": "X ray"}, None),  # two normalised matches, no exact one
    ("(b)", {"A": "CT", "B": "MRI"}, "B"),
    ("B", {"A": "O", "B": "AB", "C": "B", "D": "A"}, "C"),  # a blood group: option C's text, not letter B
    ("B", {"A": "O", "B": "AB"}, "B"),  # no option's text: the letter
    ("PET", {"A": "CT", "B": "MRI"}, None),
])
def test_answer_key_matches_the_seed_before_normalising(answer, options, key):
    assert answer_key(answer, options) == key
    if key is not None:  # scoring and the report's marked option agree
        assert per_record_correct([{"id": "q", "options": options, "answer": answer, "prediction": key}]) == [True]
        assert correct_option(answer, options) == key


def test_unicode_punctuation_is_punctuation():
    assert normalize_answer("Alzheimer\u2019s disease") == normalize_answer("Alzheimer's disease") == \
        "alzheimer s disease"
    options = {"A": "CT", "B": "T1-weighted MRI", "C": "X-ray"}
    assert parse_choice("It is an X\u2011ray.", options) == "C"  # a non-breaking hyphen
    assert parse_choice("T1\u2013weighted MRI", options) == "B"  # an en dash
    assert closed_match("Yes\u2014there is", "yes")
    assert normalize_answer("\uff38-RAY") == "x ray"  # full-width letters (NFKC)
