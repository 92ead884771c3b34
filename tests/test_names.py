import pytest

from flowattn.names import check_names


def test_known_names_pass():
    check_names(["lr", "steps"], ["steps", "lr", "seed"], "config key")
    check_names([], ["steps"], "config key")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("stepz", "unknown model option 'stepz'; did you mean 'steps'?"),
        ("zzzz", "unknown model option 'zzzz'$"),  # nothing close: no suggestion
    ],
)
def test_unknown_name_names_the_closest(name, message):
    with pytest.raises(ValueError, match=message):
        check_names(["seed", name], ["steps", "seed"], "model option")
