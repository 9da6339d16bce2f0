/* Throughput of 512-bit operations alone and in pairs on one core (docs/results.md, Zen 4 VM):
 * gcc -O2 -mavx512f -mavx512bw -mavx512vl -mfma pipes.c -o pipes && ./pipes (cycles at 3.6 GHz) */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 100000000L
#define BENCH(name, body) { __m512 a0=_mm512_set1_ps(1.0001f),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0; __m512 b=_mm512_set1_ps(0.9999f), c=_mm512_set1_ps(1e-7f); __m512i i0=_mm512_set1_epi32(3),i1=i0,i2=i0,i3=i0,i4=i0,i5=i0,i6=i0,i7=i0; __m512i ix=_mm512_set1_epi32(5); \
  double t=now(); for(long k=0;k<N/8;k++){ body; __asm__ volatile("" : "+v"(a0),"+v"(a1),"+v"(a2),"+v"(a3),"+v"(a4),"+v"(a5),"+v"(a6),"+v"(a7)); __asm__ volatile("" : "+v"(i0),"+v"(i1),"+v"(i2),"+v"(i3),"+v"(i4),"+v"(i5),"+v"(i6),"+v"(i7));} t=now()-t; \
  float s=_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a7),_mm512_castsi512_ps(_mm512_add_epi32(i0,i7)))); printf("%-40s %.2f cycles per group-of-8 op sets /8 = %.3f cycles each [%g]\n", name, t*3.6e9/(N/8), t*3.6e9/N, s);}
int main(){
  BENCH("8 fma zmm", a0=_mm512_fmadd_ps(a0,b,c);a1=_mm512_fmadd_ps(a1,b,c);a2=_mm512_fmadd_ps(a2,b,c);a3=_mm512_fmadd_ps(a3,b,c);a4=_mm512_fmadd_ps(a4,b,c);a5=_mm512_fmadd_ps(a5,b,c);a6=_mm512_fmadd_ps(a6,b,c);a7=_mm512_fmadd_ps(a7,b,c))
  BENCH("8 vpermps zmm", a0=_mm512_permutexvar_ps(ix,a0);a1=_mm512_permutexvar_ps(ix,a1);a2=_mm512_permutexvar_ps(ix,a2);a3=_mm512_permutexvar_ps(ix,a3);a4=_mm512_permutexvar_ps(ix,a4);a5=_mm512_permutexvar_ps(ix,a5);a6=_mm512_permutexvar_ps(ix,a6);a7=_mm512_permutexvar_ps(ix,a7))
  BENCH("8 vpmovzxbd zmm<-xmm", i0=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i0));i1=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i1));i2=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i2));i3=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i3));i4=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i4));i5=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i5));i6=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i6));i7=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i7)))
  BENCH("8 vpsrld zmm", i0=_mm512_srli_epi32(i0,1);i1=_mm512_srli_epi32(i1,1);i2=_mm512_srli_epi32(i2,1);i3=_mm512_srli_epi32(i3,1);i4=_mm512_srli_epi32(i4,1);i5=_mm512_srli_epi32(i5,1);i6=_mm512_srli_epi32(i6,1);i7=_mm512_srli_epi32(i7,1))
  BENCH("8 vcvtdq2ps zmm", a0=_mm512_cvtepi32_ps(i0);a1=_mm512_cvtepi32_ps(i1);a2=_mm512_cvtepi32_ps(i2);a3=_mm512_cvtepi32_ps(i3);a4=_mm512_cvtepi32_ps(i4);a5=_mm512_cvtepi32_ps(i5);a6=_mm512_cvtepi32_ps(i6);a7=_mm512_cvtepi32_ps(i7))
  BENCH("4 vpermps + 4 fma", a0=_mm512_permutexvar_ps(ix,a0);a1=_mm512_permutexvar_ps(ix,a1);a2=_mm512_permutexvar_ps(ix,a2);a3=_mm512_permutexvar_ps(ix,a3);a4=_mm512_fmadd_ps(a4,b,c);a5=_mm512_fmadd_ps(a5,b,c);a6=_mm512_fmadd_ps(a6,b,c);a7=_mm512_fmadd_ps(a7,b,c))
  BENCH("4 vpermps + 4 vpmovzx", a0=_mm512_permutexvar_ps(ix,a0);a1=_mm512_permutexvar_ps(ix,a1);a2=_mm512_permutexvar_ps(ix,a2);a3=_mm512_permutexvar_ps(ix,a3);i0=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i0));i1=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i1));i2=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i2));i3=_mm512_cvtepu8_epi32(_mm512_castsi512_si128(i3)))
  BENCH("4 fma + 4 vpsrld", a0=_mm512_fmadd_ps(a0,b,c);a1=_mm512_fmadd_ps(a1,b,c);a2=_mm512_fmadd_ps(a2,b,c);a3=_mm512_fmadd_ps(a3,b,c);i0=_mm512_srli_epi32(i0,1);i1=_mm512_srli_epi32(i1,1);i2=_mm512_srli_epi32(i2,1);i3=_mm512_srli_epi32(i3,1))
  BENCH("4 vpermps + 4 vpsrld", a0=_mm512_permutexvar_ps(ix,a0);a1=_mm512_permutexvar_ps(ix,a1);a2=_mm512_permutexvar_ps(ix,a2);a3=_mm512_permutexvar_ps(ix,a3);i0=_mm512_srli_epi32(i0,1);i1=_mm512_srli_epi32(i1,1);i2=_mm512_srli_epi32(i2,1);i3=_mm512_srli_epi32(i3,1))
  BENCH("4 fma + 4 cvt", a0=_mm512_fmadd_ps(a0,b,c);a1=_mm512_fmadd_ps(a1,b,c);a2=_mm512_fmadd_ps(a2,b,c);a3=_mm512_fmadd_ps(a3,b,c);a4=_mm512_cvtepi32_ps(i4);a5=_mm512_cvtepi32_ps(i5);a6=_mm512_cvtepi32_ps(i6);a7=_mm512_cvtepi32_ps(i7))
  BENCH("4 vpermps + 4 cvt", a0=_mm512_permutexvar_ps(ix,a0);a1=_mm512_permutexvar_ps(ix,a1);a2=_mm512_permutexvar_ps(ix,a2);a3=_mm512_permutexvar_ps(ix,a3);a4=_mm512_cvtepi32_ps(i4);a5=_mm512_cvtepi32_ps(i5);a6=_mm512_cvtepi32_ps(i6);a7=_mm512_cvtepi32_ps(i7))
  BENCH("8 vaddps zmm", a0=_mm512_add_ps(a0,b);a1=_mm512_add_ps(a1,b);a2=_mm512_add_ps(a2,b);a3=_mm512_add_ps(a3,b);a4=_mm512_add_ps(a4,b);a5=_mm512_add_ps(a5,b);a6=_mm512_add_ps(a6,b);a7=_mm512_add_ps(a7,b))
  BENCH("4 vpermps + 4 vaddps", a0=_mm512_permutexvar_ps(ix,a0);a1=_mm512_permutexvar_ps(ix,a1);a2=_mm512_permutexvar_ps(ix,a2);a3=_mm512_permutexvar_ps(ix,a3);a4=_mm512_add_ps(a4,b);a5=_mm512_add_ps(a5,b);a6=_mm512_add_ps(a6,b);a7=_mm512_add_ps(a7,b))
  BENCH("4 fma + 4 vaddps", a0=_mm512_fmadd_ps(a0,b,c);a1=_mm512_fmadd_ps(a1,b,c);a2=_mm512_fmadd_ps(a2,b,c);a3=_mm512_fmadd_ps(a3,b,c);a4=_mm512_add_ps(a4,b);a5=_mm512_add_ps(a5,b);a6=_mm512_add_ps(a6,b);a7=_mm512_add_ps(a7,b))
}
