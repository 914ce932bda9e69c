// refvit_mm_tile: an int8 matmul / 1x1-conv tile with int32 accumulation, bias and per-channel requantization.
//
// Computes one ROWS x COLS tile of refvit's conv2d (docs/spec.md, Part 2, "conv2d_accumulate", "conv2d"):
//   acc[r][q] = bias[q] + sum_k act[k][r] * wgt[q][k]          rows r = tokens, columns q = output channels
//   out[r][q] = requantize(acc[r][q], multiplier[q], shift[q], out_mode, rounding)
//
// Structure: an output-stationary ROWS x COLS MAC array. Each beat of the input stream carries one step k
// of the reduction: ROWS activations (one per token) and COLS weights (one per output channel), broadcast
// along the array's rows and columns; every PE does one int8 x int8 multiply-accumulate per beat.
// The accumulators are int32 and never wrap: the spec bounds |bias| so that |acc| <= 2^31 - 1 for every
// input, and every partial sum obeys the same bound.
// On the beat flagged in_last the finished tile moves to a drain buffer, and the next tile starts
// accumulating at once; the drain feeds one row (COLS values) per clock through COLS refvit_requant
// lanes, so the output stream is the tile's rows 0 .. ROWS-1 in order, COLS requantized values each.
//
// Stream protocol (valid / ready): a beat moves on a clock edge where in_valid and in_ready are both high.
//   in_first : first step of a tile; the accumulators start from in_bias (sampled on this beat)
//   in_last  : last step of a tile; in_multiplier and in_shift are sampled on this beat, for its drain
//   in_ready : low only for a last beat while the previous tile is still draining (a tile shorter than
//              ROWS beats then waits), so back-to-back tiles of >= ROWS beats stream without a bubble.
// Field packing (byte-aligned for the host): act row r at [8r +: 8], weight / bias / multiplier / shift of
// column q at [8q +: 8], [32q +: 32], [32q +: 31] (bit 31 of the field must be 0), [8q +: 6];
// out_data column q at [32q +: 32], sign-extended.
`default_nettype none

module refvit_mm_tile #(
    parameter int ROWS = 8,
    parameter int COLS = 8,
    parameter int HAS_DOUBLE_ROUND = 1
) (
    input  wire                 clk,
    input  wire                 rst_n,
    input  wire  [1:0]          out_mode,       // refvit_requant's: 0 int8, 1 int16, 2 int32
    input  wire                 double_round,
    // input stream: one reduction step per beat
    input  wire                 in_valid,
    output logic                in_ready,
    input  wire                 in_first,
    input  wire                 in_last,
    input  wire  [ROWS*8-1:0]   in_act,
    input  wire  [COLS*8-1:0]   in_wgt,
    input  wire  [COLS*32-1:0]  in_bias,
    input  wire  [COLS*32-1:0]  in_multiplier,
    input  wire  [COLS*8-1:0]   in_shift,
    // output stream: one tile row per beat
    output logic                out_valid,
    output logic [COLS*32-1:0]  out_data
);
    localparam int RW = (ROWS > 1) ? $clog2(ROWS) : 1;

    // ---- drain state
    logic          drain_busy;
    logic [RW-1:0] drain_row;
    wire  drain_done_now = drain_busy && drain_row == RW'(ROWS - 1);   // last row leaves the buffer this clock
    assign in_ready = !in_last || !drain_busy || drain_done_now;
    wire  step = in_valid && in_ready;
    wire  tile_done = step && in_last;

    // ---- the MAC array: PE (r, q) holds the accumulator of token r, output channel q
    for (genvar q = 0; q < COLS; q++) begin : g_colbus
        wire signed [7:0]  w    = in_wgt[8*q +: 8];                         // the beat's weight of column q
        wire signed [31:0] bias = in_bias[32*q +: 32];
    end
    logic signed [31:0] drain_buf [ROWS*COLS];
    for (genvar r = 0; r < ROWS; r++) begin : g_row
        wire signed [7:0] a = in_act[8*r +: 8];                             // the beat's activation of row r
        for (genvar q = 0; q < COLS; q++) begin : g_col
            logic signed [31:0] acc;
            wire  signed [15:0] prod = a * g_colbus[q].w;                        // |a*w| <= 128 * 128
            wire  signed [31:0] acc_next = (in_first ? g_colbus[q].bias : acc) + prod;
            always_ff @(posedge clk) begin
                if (step)      acc                   <= acc_next;
                if (tile_done) drain_buf[r*COLS + q] <= acc_next;
            end
        end
    end

    // ---- drain: one row per clock into the requantizers
    logic [COLS*32-1:0] drain_mult;
    logic [COLS*8-1:0]  drain_shift;
    always_ff @(posedge clk) begin
        if (!rst_n) begin
            drain_busy <= 1'b0;
            drain_row  <= '0;
        end else if (tile_done) begin                 // a finished tile (possibly while the last row drains)
            drain_busy  <= 1'b1;
            drain_row   <= '0;
            drain_mult  <= in_multiplier;
            drain_shift <= in_shift;
        end else if (drain_busy) begin
            drain_busy <= !drain_done_now;
            drain_row  <= drain_row + RW'(1);
        end
    end

    logic [COLS-1:0] lane_valid;
    for (genvar q = 0; q < COLS; q++) begin : g_requant
        refvit_requant #(.HAS_DOUBLE_ROUND(HAS_DOUBLE_ROUND)) u_requant (
            .clk, .rst_n, .out_mode, .double_round,
            .in_valid      (drain_busy),
            .in_value      (drain_buf[drain_row * COLS + q]),
            .in_multiplier (drain_mult[32*q +: 31]),
            .in_shift      (drain_shift[8*q +: 6]),
            .out_valid     (lane_valid[q]),
            .out_value     (out_data[32*q +: 32])
        );
    end
    assign out_valid = lane_valid[0];
endmodule

`default_nettype wire
