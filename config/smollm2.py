"""
The real-model study (RESULTS.md, section 1): SmolLM2-135M fine-tuned in float32 past exact recall of 16 bios and
released in bf16, unlearned by GA+GDR in pure bf16 at four times the paper's learning rate for 75 steps (the cell of
the lr x steps map, RESULTS.md 1e, with the lr x steps of the previous default, 3e-5 x 100, in three quarters of its
steps), read at int8, RTN per channel at 5 bits (where the target keeps most of its memorization) and FP4
(bitsandbytes' load_in_4bit default).

$ python evaluate.py config/smollm2.py                         # one seed
$ python evaluate.py config/smollm2.py --seeds 1337,1338,1339  # flags after the config win over it

One method and four precisions, so that a seed with training fits 20 minutes on 2 cores with or without native bf16
(its time: RESULTS.md, 1a); the method and the rows run one after the other in this process with two torch threads
each (a fixed number, as threads change float order). --methods ga_gdr,npo_klr, rtn6, rtn4 and Table 2's calibrated
quantizers (--precisions) are the larger settings.
"""
base = "hf:smollm2"
out_dir = "out_smollm2"
fig_dir = "out_smollm2/figures"
dtype = "bfloat16"
methods = "ga_gdr"
precisions = "full,int8,rtn5,fp4"
el_stride = 0
workers = 1
job_threads = 2
vary_data = True
unlearn_args = "--lr 4e-5 --steps 75 --log_interval 25"
train_args = "--n_facts 4 --n_book 0 --n_secrets 0 --mem_reps 32 --tune_lr 1e-4 --save_dtype bfloat16"
