// refvit_requant: the requantizer of refvit's integer DeiT, one value per clock.
//
//   out = saturate(apply_scale(value, multiplier, shift, rounding), out_mode)
//
// apply_scale is TOSA apply_scale_32 (docs/spec.md, Part 1, "apply_scale"):
//   SINGLE_ROUND : y = (value * multiplier + 2^(shift-1)) >>> shift          (ties toward +inf)
//   DOUBLE_ROUND : the same with 2^30 added (product >= 0) or subtracted (product < 0) when shift > 31,
//                  which is TFLite's MultiplyByQuantizedMultiplier (the spec proves the two equal).
// Domain (the caller's contract, as in the spec): value int32 with |value| < 2^(shift-1) where shift <= 31,
// 0 <= multiplier <= 2^31 - 1, 2 <= shift <= 62. Then |product| < 2^62, the rounded sum fits 64 bits
// signed and |y| <= 2^30, so y fits 32 bits and out_mode INT32 never clamps (that is apply_scale itself).
//
// Pipeline: 3 stages (multiply | round + shift | clamp), a result every clock, latency 3.
// Build-time options:
//   HAS_DOUBLE_ROUND = 0 removes the DOUBLE_ROUND adder term (the double_round input is then ignored).
//   `define REFVIT_RTL_BUG_TIES_DOWN: a deliberately broken build whose rounding constant is 2^(shift-1) - 1,
//   i.e. exact ties round down. Only for showing that the conformance suite catches it.
`default_nettype none

module refvit_requant #(
    parameter int HAS_DOUBLE_ROUND = 1
) (
    input  wire               clk,
    input  wire               rst_n,
    // configuration: static while values flow
    input  wire        [1:0]  out_mode,       // 0: int8, 1: int16, 2: int32 (no clamp: apply_scale)
    input  wire               double_round,   // 0: SINGLE_ROUND, 1: DOUBLE_ROUND
    // input stream
    input  wire               in_valid,
    input  wire signed [31:0] in_value,
    input  wire        [30:0] in_multiplier,  // 0 .. 2^31 - 1
    input  wire        [5:0]  in_shift,       // 2 .. 62
    // output stream
    output logic              out_valid,
    output logic signed [31:0] out_value      // sign-extended to 32 bits whatever out_mode is
);
    localparam logic [1:0] MODE_INT8 = 2'd0, MODE_INT16 = 2'd1;

    // ---- stage 1: the 32 x 32 signed product (the multiplier as a non-negative signed operand)
    logic               s1_valid;
    logic signed [63:0] s1_prod;
    logic        [5:0]  s1_shift;
    always_ff @(posedge clk) begin
        s1_valid <= in_valid & rst_n;
        s1_prod  <= 64'(in_value) * 64'($signed({1'b0, in_multiplier}));   // |prod| < 2^62
        s1_shift <= in_shift;
    end

    // ---- stage 2: add the rounding constant, arithmetic shift right
    logic signed [63:0] rnd, sum;
    always_comb begin
        rnd = 64'sd1 <<< (s1_shift - 6'd1);                                  // 2^(shift-1)
`ifdef REFVIT_RTL_BUG_TIES_DOWN
        rnd = rnd - 64'sd1;                                                  // BROKEN: ties round down
`endif
        if (HAS_DOUBLE_ROUND != 0 && double_round && s1_shift > 6'd31)
            rnd = s1_prod < 0 ? rnd - 64'sd1073741824 : rnd + 64'sd1073741824;   // -/+ 2^30
        sum = s1_prod + rnd;                                                 // |sum| < 2^62 + 2^61 + 2^30
    end

    logic               s2_valid;
    logic signed [31:0] s2_y;
    always_ff @(posedge clk) begin
        s2_valid <= s1_valid & rst_n;
        s2_y     <= 32'(sum >>> s1_shift);                                   // |y| <= 2^30: exact in 32 bits
    end

    // ---- stage 3: saturate to the output type
    always_ff @(posedge clk) begin
        out_valid <= s2_valid & rst_n;
        case (out_mode)
            MODE_INT8:  out_value <= s2_y > 127   ? 32'sd127   : (s2_y < -128   ? -32'sd128   : s2_y);
            MODE_INT16: out_value <= s2_y > 32767 ? 32'sd32767 : (s2_y < -32768 ? -32'sd32768 : s2_y);
            default:    out_value <= s2_y;
        endcase
    end
endmodule

// LANES requantizers side by side: the elementwise unit (apply_scale / requantize on a vector per clock).
// Fields are byte-aligned for the host: lane l's value at [32l +: 32], multiplier at [32l +: 31] (bit 31 of
// each field must be 0), shift at [8l +: 6].
module refvit_requant_array #(
    parameter int LANES = 8,
    parameter int HAS_DOUBLE_ROUND = 1
) (
    input  wire                  clk,
    input  wire                  rst_n,
    input  wire  [1:0]           out_mode,
    input  wire                  double_round,
    input  wire                  in_valid,
    input  wire  [LANES*32-1:0]  in_value,
    input  wire  [LANES*32-1:0]  in_multiplier,
    input  wire  [LANES*8-1:0]   in_shift,
    output logic                 out_valid,
    output logic [LANES*32-1:0]  out_value
);
    logic [LANES-1:0] lane_valid;
    for (genvar l = 0; l < LANES; l++) begin : g_lane
        refvit_requant #(.HAS_DOUBLE_ROUND(HAS_DOUBLE_ROUND)) u_requant (
            .clk, .rst_n, .out_mode, .double_round, .in_valid,
            .in_value      (in_value[32*l +: 32]),
            .in_multiplier (in_multiplier[32*l +: 31]),
            .in_shift      (in_shift[8*l +: 6]),
            .out_valid     (lane_valid[l]),
            .out_value     (out_value[32*l +: 32])
        );
    end
    assign out_valid = lane_valid[0];
endmodule

`default_nettype wire
