// gguf_greedy_ids.cpp: token ids in, greedy token ids (+ logits) out, through an engine's own
// libllama. Used by scripts/gguf_engines.sh (the tool that made the engines' recorded outputs in
// fixtures/gguf/engines_greedy.json). Build with -DFORK_API for bitnet.cpp's llama.cpp fork
// (2024 API); without it for mainline llama.cpp 0c1e570's API.
// usage: gguf_greedy_ids MODEL N_NEW ID,ID,ID,...   (ids used verbatim, no BOS added)
// prints one JSON object: prompt_ids, greedy_ids, greedy_pieces, top5_per_step [[id, logit]...],
// step0_logits (the whole vocabulary). Greedy = argmax, ties -> lowest id.
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <string>
#include <algorithm>

static void print_piece(const llama_model * model, llama_token t) {
    char buf[256];
#ifdef FORK_API
    int n = llama_token_to_piece(model, t, buf, sizeof(buf), 0, true);
#else
    int n = llama_token_to_piece(llama_model_get_vocab(model), t, buf, sizeof(buf), 0, true);
#endif
    if (n < 0) n = 0;
    std::string s(buf, n), o;
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { o += '\\'; o += (char)c; }
        else if (c < 0x20) { char e[8]; snprintf(e, sizeof e, "\\u%04x", c); o += e; }
        else o += (char)c;
    }
    printf("\"%s\"", o.c_str());
}

int main(int argc, char ** argv) {
    if (argc < 4) { fprintf(stderr, "usage: %s MODEL N_NEW ID,ID,...\n", argv[0]); return 1; }
    const char * path = argv[1];
    int n_new = atoi(argv[2]);
    std::vector<llama_token> prompt;
    for (char * p = strtok(argv[3], ","); p; p = strtok(nullptr, ",")) prompt.push_back(atoi(p));

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
#ifdef FORK_API
    llama_model * model = llama_load_model_from_file(path, mp);
#else
    llama_model * model = llama_model_load_from_file(path, mp);
#endif
    if (!model) { fprintf(stderr, "load failed\n"); return 2; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 256; cp.n_threads = 1; cp.n_threads_batch = 1;
#ifdef FORK_API
    llama_context * ctx = llama_new_context_with_model(model, cp);
    const int n_vocab = llama_n_vocab(model);
#else
    llama_context * ctx = llama_init_from_model(model, cp);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
#endif
    if (!ctx) { fprintf(stderr, "ctx failed\n"); return 3; }

    std::vector<llama_token> cur = prompt, out;
    std::vector<std::vector<std::pair<int,float>>> tops;
    std::vector<float> step0;
    int n_past = 0;
    for (int step = 0; step < n_new; ++step) {
#ifdef FORK_API
        llama_batch b = llama_batch_get_one(cur.data(), (int)cur.size(), n_past, 0);
#else
        llama_batch b = llama_batch_get_one(cur.data(), (int)cur.size());
#endif
        if (llama_decode(ctx, b) != 0) { fprintf(stderr, "decode failed\n"); return 4; }
        n_past += (int)cur.size();
        const float * lg = llama_get_logits_ith(ctx, -1);
        if (step == 0) step0.assign(lg, lg + n_vocab);
        std::vector<int> idx(n_vocab);
        for (int i = 0; i < n_vocab; ++i) idx[i] = i;
        std::partial_sort(idx.begin(), idx.begin() + 5, idx.end(), [&](int a, int c) {
            return lg[a] > lg[c] || (lg[a] == lg[c] && a < c); });
        std::vector<std::pair<int,float>> t;
        for (int k = 0; k < 5; ++k) t.push_back({idx[k], lg[idx[k]]});
        tops.push_back(t);
        llama_token id = idx[0];   // argmax, ties -> lowest id
        out.push_back(id);
        cur.assign(1, id);
    }
    printf("{\"prompt_ids\": [");
    for (size_t i = 0; i < prompt.size(); ++i) printf("%s%d", i ? ", " : "", prompt[i]);
    printf("], \"greedy_ids\": [");
    for (size_t i = 0; i < out.size(); ++i) printf("%s%d", i ? ", " : "", out[i]);
    printf("], \"greedy_pieces\": [");
    for (size_t i = 0; i < out.size(); ++i) { if (i) printf(", "); print_piece(model, out[i]); }
    printf("], \"top5_per_step\": [");
    for (size_t s = 0; s < tops.size(); ++s) {
        printf("%s[", s ? ", " : "");
        for (int k = 0; k < 5; ++k) printf("%s[%d, %.9g]", k ? ", " : "", tops[s][k].first, tops[s][k].second);
        printf("]");
    }
    printf("], \"step0_logits\": [");
    for (int i = 0; i < n_vocab; ++i) printf("%s%.9g", i ? ", " : "", step0[i]);
    printf("]}\n");
    llama_free(ctx);
#ifdef FORK_API
    llama_free_model(model);
#else
    llama_model_free(model);
#endif
    llama_backend_free();
    return 0;
}
