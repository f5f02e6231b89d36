// A kernel with a compile error on line 5 (undeclared identifier).
extern "C" __global__ void broken(float* out, int n) {
    const int i = threadIdx.x;
    if (i < n)
        out[i] = undeclared_value * 2.0f;
}
