"""`hf-reinforce real-demo`: the whole method on a real chat model, SmolLM2-135M-Instruct (needs the `real` extra).

Its stages, one module each:

* `data`: the prompts and items, their split, and the JSON-lines files;
* `judge`: the gold judge, VADER's sentiment score;
* `sampling`: answers sampled as the REINFORCE recipe samples them;
* `preferences`: pairs of the model's own answers, labelled by the judge;
* `training`: the reward model and the REINFORCE trainer, from copies of the SmolLM2 recipes (`recipes/`);
* `evaluation`: the reward model against the judge, the policy's gold reward and KL before and after;
* `report`: the summary over seeds, its plot and table;
* `arguments` and `cli`: the command's flags, and the run over seeds (`main`).

Run it as `hf-reinforce real-demo` or `python -m hf_reinforce.examples.real_demo`.
"""
