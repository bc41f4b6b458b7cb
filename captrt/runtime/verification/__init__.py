"""What a precision's quality is verified on and measured with: the model directory's parity set (images,
references and fp32 captions) and the corpus metrics BLEU-4 and CIDEr-D. captrt.runtime.verification.verify runs the
verification when a model loads (verification.speed times it beside fp32); the exporter writes the parity set. numpy
only, like the rest of the runtime."""
