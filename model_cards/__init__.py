"""Model card templates (`pretrained.md`, `finetuned.md`, `lora.md`), shipped inside the package as
`cat_hf.model_cards` and rendered by `cat_hf.hub.render_model_card`.

Each template is YAML front matter with the metadata defaults of its kind (license, library, pipeline tag,
tags), then a Markdown body with `${placeholder}` fields (Python `string.Template` syntax; `$$` is a literal
dollar) that the renderer fills from the model folder: config, training record and measured evaluations.
"""
