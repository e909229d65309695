"""SamplingParams validation: bad values and unimplemented vLLM fields are ValueErrors naming them."""
import pytest

from jaxserve.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logprobs=-2), "logprobs"), (dict(logit_bias={-5: 1.0}), "logit_bias"),
    (dict(logit_bias={5: "1"}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"), (dict(bad_words=[3]), "bad_words"),
])
def test_bad_values_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_defaults_and_off_values():
    p = SamplingParams(top_k=-1)
    assert p.top_k == 0 and not p.uses_penalties and not p.greedy
    assert SamplingParams(repetition_penalty=1.05).uses_penalties
