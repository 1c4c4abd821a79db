/* 64 MiB of zero-initialised data: does not fit in a small --memory. */
static char big[64 << 20];

int main(void)
{
    big[sizeof big - 1] = 1;
    return big[0];
}
