# Derive trace files with monitoring gaps (30 min to 3 h removed) from the
# development traces, to exercise the post-restart subset. Values are real;
# only rows are removed.
#
# usage: python3 make_gaps.py SRC_DIR OUT_DIR
# The output files keep their names, so `prescient eval --model` scores only
# the held-out series of files the model was trained on.
import gzip, os, random, sys
src_dir, out_dir = sys.argv[1], sys.argv[2]
os.makedirs(out_dir, exist_ok=True)
random.seed(5)
for name in ["azure-v1", "azure-v1-max", "planetlab"]:
    src = os.path.join(src_dir, f"{name}.csv.gz")
    with gzip.open(src, "rt") as f, gzip.open(os.path.join(out_dir, f"{name}.csv.gz"), "wt") as g:
        g.write(f.readline())
        cur = None; drop_until = -1; idx = 0
        for line in f:
            s = line.split(",", 1)[0]
            if s != cur:
                cur = s; idx = 0; drop_until = -1
            # start a gap with prob. 1/150 per row after the first 8 h
            if idx > drop_until and idx > 96 and random.random() < 1 / 150:
                drop_until = idx + random.randint(6, 36) - 1
            if idx > drop_until:
                g.write(line)
            idx += 1
    print(name, "done")
